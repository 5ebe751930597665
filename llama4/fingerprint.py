"""The model fingerprint: one id for exactly these weights, shared by every service.

It is a SHA-256 over config.json and, for every safetensors file, a digest of the whole file:
its header (every tensor's name, dtype, shape and offsets) and every tensor byte, so two
checkpoints that differ in one value anywhere differ. Hashing runs at about a gigabyte per
second per core, so the per-file digests are kept, keyed by each file's size and mtime: in
`herd.fingerprint.json` beside the checkpoint when the directory is writable (computed once
per volume), and under the herd cache otherwise (once per machine). A changed file is hashed again.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path

VERSION = 2
SIDECAR = "herd.fingerprint.json"
READ_BYTES = 16 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stats(folder: Path, files: list[str]) -> dict[str, list[int]]:
    out = {}
    for name in files:
        st = (folder / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _cached(path: Path, stats: dict) -> dict[str, str] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("version") == VERSION and record.get("files") == stats:
        return record.get("digests")
    return None


def _store(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:
        pass  # a read-only volume: the other place keeps it


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint directory (from its index, else model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def fingerprint(folder: Path, files: list[str], cache_dir: Path) -> str:
    """32 hex digits identifying config.json and the given weight files of folder."""
    folder = folder.resolve()
    stats = _stats(folder, files)
    cache = cache_dir / "fingerprints" / (hashlib.sha256(str(folder).encode()).hexdigest()[:32] + ".json")
    digests = _cached(folder / SIDECAR, stats) or _cached(cache, stats)
    if digests is None or set(digests) != set(files):
        with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashlib drops the GIL
            digests = dict(zip(files, pool.map(lambda n: file_digest(folder / n), files), strict=True))
        record = {"version": VERSION, "files": stats, "digests": digests}
        _store(folder / SIDECAR, record)
        _store(cache, record)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for name in sorted(files):
        h.update(f"{name}\0{digests[name]}\0".encode())
    return h.hexdigest()[:32]
