"""What the model fingerprint costs: hashing every byte of a 10 GB checkpoint once, and the
cached digests on every later start. Writes the files into a temporary folder, then deletes it.
Run: .venv/bin/python -m bench.bench_fingerprint [--gib 10] [--shards 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import print_table
from llama4.fingerprint import SIDECAR, fingerprint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=10.0)
    ap.add_argument("--shards", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp, \
            tempfile.TemporaryDirectory() as cache:
        folder = Path(tmp)
        (folder / "config.json").write_text("{}")
        block = os.urandom(64 << 20)
        per_shard = int(args.gib * 2**30 / args.shards)
        files = []
        for i in range(args.shards):
            name = f"model-{i:05d}-of-{args.shards:05d}.safetensors"
            with open(folder / name, "wb") as f:
                for _ in range(per_shard // len(block)):
                    f.write(block)
            files.append(name)
        total = sum((folder / n).stat().st_size for n in files)
        start = time.perf_counter()
        first = fingerprint(folder, files, Path(cache))
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        again = fingerprint(folder, files, Path(cache))
        cached = time.perf_counter() - start
        assert first == again and (folder / SIDECAR).exists()
    rows = [["first start: hash every byte", hashed, total / hashed / 1e9],
            ["later starts: cached digests", cached, float("nan")]]
    print_table(f"fingerprint of {total / 2**30:.1f} GiB in {args.shards} files (in the page cache)",
                ["case", "seconds", "GB/s"], rows)


if __name__ == "__main__":
    main()
