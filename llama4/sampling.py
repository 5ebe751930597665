"""Sampling parameters and token selection: greedy, temperature, top-k, top-p, seeded.

Every accepted parameter set samples safely: temperatures below GREEDY_BELOW are greedy
(as vLLM treats them), and logits are shifted by their maximum before the division, so no
temperature can overflow them. Log-probabilities reported to users are those of the model's
own distribution (log_softmax of the raw logits), whatever the sampling temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from llama4.errors import need

GREEDY_BELOW = 1e-5  # temperatures in [0, GREEDY_BELOW) mean greedy decoding


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int, max_tokens_limit: int | None = None) -> None:
        limit = max_tokens_limit if max_tokens_limit is not None else 2**31 - 1
        need(isinstance(self.max_tokens, int) and 0 <= self.max_tokens <= limit, "max_tokens", self.max_tokens,
             f"an integer from 0 to {limit}")
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
             f"a finite number >= 0 (below {GREEDY_BELOW:g} = greedy)")
        need(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        need(0 <= self.top_k <= vocab_size, "top_k", self.top_k, f"an integer from 0 (off) to {vocab_size}")
        need(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2^63)")
        for t in self.stop_token_ids:
            need(0 <= t < vocab_size, "stop_token_ids", t, f"token ids in [0, {vocab_size})")

    def normalized(self) -> SamplingParams:
        """The same parameters with a temperature below GREEDY_BELOW made exactly greedy."""
        return replace(self, temperature=0.0) if self.temperature < GREEDY_BELOW else self

    def make_generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from fp32 logits [V]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu()
    scaled = (scaled - scaled.max()) / params.temperature  # <= 0 everywhere, 0 at the top: no overflow
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= params.top_p
        scaled[order[drop]] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
