"""Peak memory of Score on long prompts: log-probabilities chunk by chunk vs all rows at once.

Each case runs in a fresh process on tiny-maverick (Llama 4's 202,048-token vocabulary, so a
[rows, vocab] fp32 block is 0.8 MB per row) and reports how much its peak resident memory grew
during one Score of the prompt. "all rows" sets the chunk to the prompt length, which is what
one [rows, vocab] logits tensor costs.
Run: .venv/bin/python -m bench.bench_score
"""
from __future__ import annotations

import json
import subprocess
import sys

from bench.common import print_table

CHILD = """
import json, resource, sys, torch
import llama4.model
from llama4.checkpoint import Checkpoint
from llama4.engine import Engine, Request
from llama4.sampling import SamplingParams
from llama4.store import resolve_model
rows, chunk = int(sys.argv[1]), int(sys.argv[2])
llama4.model.LOGPROB_CHUNK = chunk
model = llama4.model.Llama4Model.load(Checkpoint(resolve_model("tiny-maverick")))
ids = torch.randint(3, 200000, (rows,), generator=torch.Generator().manual_seed(0)).tolist()
engine = Engine(model, max_step_tokens=rows)
engine.run([Request(ids[:8], SamplingParams(max_tokens=0), prompt_logprobs=True)])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True)])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mib": (after - before) / 1024}))
"""


def peak_growth(rows: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(chunk)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["grew_mib"]


def main() -> None:
    rows = []
    for n in (512, 2048):
        chunked, whole = peak_growth(n, 256), peak_growth(n, n)
        rows.append([n, chunked, whole, n * 202048 * 4 / 2**20])
    print_table("Score peak memory growth (MiB), tiny-maverick, one step per prompt",
                ["prompt tokens", "chunked (256 rows)", "all rows at once", "[rows, vocab] fp32"], rows)


if __name__ == "__main__":
    main()
