"""Continuous batching over the layer stack: sequences join and leave between steps.

The scheduler is plain Python over sequences (no tensors, no I/O). Each step packs the
decode token of every running sequence and prefill chunks of new ones, within a token
budget, runs one forward pass and samples. The same engine serves the monolithic CLI and
the attention service; only the model's MoE backend differs.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llama4.errors import HerdInputError
from llama4.kv_cache import CacheFull
from llama4.model import Llama4Model
from llama4.sampling import SamplingParams, sample


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    prompt_logprobs: bool = False  # score mode: log p(token_i | tokens_<i) for the prompt
    trace_routes: bool = False  # report the expert and worker of every MoE layer for each token


@dataclass
class Sequence:
    request: Request
    tokens: list[int]
    generator: torch.Generator | None
    num_computed: int = 0  # tokens whose KV is in the cache
    output_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # chained prefix hashes (KV tier)
    num_cached: int = 0  # prompt tokens loaded from the KV tier instead of computed
    num_blocks_saved: int = 0  # leading full blocks already in the KV tier

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    seq: Sequence
    token: int | None  # None when a step only advanced a prefill or finished a score request
    logprob: float | None
    route: list[tuple[int, int, int]] | None = None  # (layer, expert, worker) of the row that produced token


class KVTier(Protocol):
    """A second KV tier behind the in-memory cache (see attention_svc.kv_tier)."""

    def load_prefix(self, seq: "Sequence", cache) -> int:
        """Load the longest cached prefix of seq.tokens into cache; returns its length in tokens."""

    def store(self, seq: "Sequence", cache, end: int) -> None:
        """Save every full block of seq below position `end` not saved yet."""


@dataclass
class StepStats:
    num_seqs: int
    num_tokens: int
    num_decodes: int


class Engine:
    def __init__(self, model: Llama4Model, max_num_seqs: int = 64, max_step_tokens: int = 2048,
                 max_cache_tokens: int = 65536, block_size: int = 16, max_model_len: int | None = None,
                 kv_tier: KVTier | None = None):
        self.model = model
        self.kv_tier = kv_tier
        self.tokens_computed = 0  # tokens that went through the model (prefill + decode)
        self.cfg = model.cfg
        self.cache = model.new_cache(max_cache_tokens, block_size)
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stop_ids = frozenset(self.cfg.eos_token_id)
        self._ids = itertools.count()
        self.last_step: StepStats | None = None

    # ---- admission ----
    def validate(self, req: Request) -> None:
        vocab = self.cfg.vocab_size
        if not req.prompt_ids:
            raise HerdInputError("prompt is empty; allowed: at least one token")
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise HerdInputError(f"prompt token id {bad[0]} is out of range; allowed: [0, {vocab})")
        req.params.validate(vocab)
        total = len(req.prompt_ids) + req.params.max_tokens
        if total > self.max_model_len:
            raise HerdInputError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) = {total} "
                f"exceeds the context limit {self.max_model_len}")
        if total > self.cache.capacity[self.cache.kinds[0]] * self.cache.block_size:
            raise HerdInputError(f"prompt + max_tokens = {total} exceeds the KV cache size")

    def add(self, req: Request) -> Sequence:
        self.validate(req)
        if not req.request_id:
            req.request_id = f"req-{next(self._ids)}"
        seq = Sequence(req, list(req.prompt_ids), req.params.make_generator())
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        for seq in list(self.running) + list(self.waiting):
            if seq.id == request_id and not seq.finished:
                seq.finish_reason = "abort"
        self._reap()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----
    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.max_step_tokens, []
        # Running sequences first: decodes, then the rest of partially prefilled prompts.
        for seq in self.running:
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(len(seq.tokens), budget)
            if not self._fits(seq):
                break  # it waits: admitted sequences must be able to finish without preemption
            self.waiting.popleft()
            self.running.append(seq)
            if self.kv_tier is not None and not seq.request.prompt_logprobs:
                seq.num_computed = seq.num_cached = self.kv_tier.load_prefix(seq, self.cache)
                n = min(len(seq.tokens) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _fits(self, new: Sequence) -> bool:
        """Whether the cache can hold every running sequence and `new` up to their last token."""
        final = lambda s: s.num_prompt + s.request.params.max_tokens
        blocks = sum(max(self.cache.blocks_needed(s.id, final(s)), 0) for s in [*self.running, new])
        return blocks * self.cache.block_size <= self.cache.num_free_tokens()

    def step(self) -> list[TokenEvent]:
        batch = self._schedule()
        if not batch:
            if self.waiting:
                raise CacheFull("kv cache cannot hold the next waiting request")
            return []
        entries, tokens, logit_rows, row = [], [], [], 0
        for seq, n in batch:
            self.cache.ensure(seq.id, seq.num_computed + n)
            entries.append((seq.id, seq.num_computed, n))
            tokens.extend(seq.tokens[seq.num_computed : seq.num_computed + n])
            if seq.request.prompt_logprobs and seq.num_computed < seq.num_prompt:
                logit_rows.extend(range(row, row + n))
            elif seq.num_computed + n == len(seq.tokens):
                logit_rows.append(row + n - 1)
            row += n
        plan = self.cache.plan(entries)
        device = self.model.device
        logits = self.model.forward(torch.tensor(tokens, device=device), plan, self.cache,
                                    torch.tensor(logit_rows, dtype=torch.long, device=device))
        log_z = torch.logsumexp(logits, dim=-1)  # [M]: log p(t) = logit[t] - log_z, no [M, V] copy
        greedy = torch.argmax(logits, dim=-1).tolist()
        self.last_step = StepStats(len(batch), len(tokens), sum(1 for _, n in batch if n == 1))
        self.tokens_computed += len(tokens)

        events, row = [], 0
        row_of = {r: i for i, r in enumerate(logit_rows)}
        for seq, n in batch:
            start = seq.num_computed
            if seq.request.prompt_logprobs and start < seq.num_prompt:
                if start == 0:
                    seq.prompt_logprobs.append(None)
                for j in range(n):
                    pos = start + j + 1  # the token this row predicts
                    if pos < seq.num_prompt:
                        r = row_of[row + j]
                        seq.prompt_logprobs.append(float(logits[r, seq.tokens[pos]] - log_z[r]))
            seq.num_computed += n
            if self.kv_tier is not None:
                self.kv_tier.store(seq, self.cache, seq.num_computed)  # before chunked blocks are released
            self.cache.release_before(seq.id, seq.num_computed)
            last = row + n - 1
            row += n
            if seq.num_computed < len(seq.tokens):
                continue  # prefill chunk, more to come
            if seq.request.params.max_tokens == 0:
                seq.finish_reason = "length"
                events.append(TokenEvent(seq, None, None))
                continue
            i = row_of[last]
            token = greedy[i] if seq.generator is None else sample(logits[i], seq.request.params, seq.generator)
            lp = float(logits[i, token] - log_z[i])
            seq.tokens.append(token)
            seq.output_logprobs.append(lp)
            params = seq.request.params
            if (token in params.stop_token_ids) or (not params.ignore_eos and token in self.stop_ids):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= params.max_tokens:
                seq.finish_reason = "length"
            route = None
            if seq.request.trace_routes:
                routes = self.model.moe.last_routes
                route = [(l, int(routes[l][0][last]), int(routes[l][1][last])) for l in sorted(routes)]
            events.append(TokenEvent(seq, token, lp, route))
        self._reap()
        return events

    def _reap(self) -> None:
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self.cache.free(seq.id)
        self.waiting = deque(s for s in self.waiting if not s.finished)

    def run(self, requests: list[Request]) -> list[Sequence]:
        """Run requests to completion together (continuous batching); returns them in order."""
        seqs = [self.add(r) for r in requests]
        while self.has_work:
            self.step()
        return seqs
