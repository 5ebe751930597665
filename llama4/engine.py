"""Continuous batching over the layer stack: sequences join and leave between steps.

The scheduler is plain Python over sequences (no tensors, no I/O). Each step packs the
decode token of every running sequence and prefill chunks of new ones, within a token
budget, runs one forward pass and samples: step() = _schedule (which sequences, how many
tokens each), _prepare (blocks and packing), _run (the forward pass) and _postprocess
(logprobs, KV tier saves, sampling, stops, route traces). The same engine serves the
monolithic CLI and the attention service; only the model's MoE backend differs. A step whose
rows a backend refuses (RowsRefused) is bisected so that only the sequences it came from fail.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from llama4.config import MAX_MICRO_BATCHES, LayerKind
from llama4.errors import HerdInputError, need
from llama4.kv_cache import DEFAULT_BLOCK_SIZE, CacheFull
from llama4.model import Llama4Model, MicroBatch
from llama4.moe import Route, RowsRefused
from llama4.sampling import sample
from llama4.scheduler import QueueFull, Scheduler, split_batch
from llama4.sequence import Request, Sequence

__all__ = ["Engine", "Request", "Sequence", "TokenEvent", "QueueFull", "KVTier", "EntryKey", "TierStats",
           "RowsRefused"]

MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's limit)
# micro_batches="auto": a step of at least this many tokens (over 2+ sequences) is cut in two when the
# experts are remote and attention runs on an accelerator. On a CPU the split never paid in bench_cluster
# (batch 1 to 64 and prefill 4 x 512: 2 micro-batches ran at 0.75-0.93x of 1): attention and the experts
# share the same cores, so there is no idle side to overlap, and every extra exchange costs CPU time.
AUTO_MICRO_BATCH_TOKENS = 64
# A refused step is bisected (Engine._isolate): each halving re-runs both halves, so 2 runs per halving
# find one culprit and twice that find two. The sequences still unresolved then fail as a whole step does.
ISOLATION_RUNS_PER_HALVING = 4


@dataclass
class TokenEvent:
    seq: Sequence
    token: int | None  # None when a step only advanced a prefill or finished a score request
    logprob: float | None
    route: list[tuple[int, int, int]] | None = None  # (layer, expert, worker) of the row that produced token
    top: list[tuple[int, float]] | None = None  # with Request.top_logprobs: the most likely tokens and logprobs


class EntryKey(NamedTuple):
    """One KV tier entry: a block's chained hash, its layer kind, the position after its last token."""

    block_hash: bytes
    kind: LayerKind
    end_pos: int


@dataclass
class TierStats:
    hits: int = 0  # lookups that loaded a prefix (counted by the engine)
    misses: int = 0
    tokens_loaded: int = 0
    load_seconds: float = 0.0
    bytes_read: int = 0  # counted by the tier
    bytes_written: int = 0
    corrupt: int = 0
    errors: int = 0


class KVTier(Protocol):
    """A second KV tier behind the in-memory cache: entries in and out (see attention_svc.kv_tier).

    Every method is a cache operation: on failure it answers "absent" or False, never raises."""

    block_size: int
    hash_seed: bytes  # the chain's start: keys of different models never meet
    stats: TierStats

    def available(self) -> bool:
        """False while the tier is known to be down (calls would fail)."""

    def count_present(self, hashes: list[bytes], kind: LayerKind) -> int:
        """How many leading blocks have an entry of `kind`."""

    def get(self, keys: list[EntryKey]) -> list[torch.Tensor | None]:
        """Each entry's KV, or None where it is missing or fails its checks."""

    def put(self, entries: list[tuple[EntryKey, torch.Tensor]]) -> bool:
        """Store entries; True when all were written."""


@dataclass
class StepStats:
    num_seqs: int
    num_tokens: int
    num_decodes: int
    num_micro_batches: int = 1


@dataclass
class StepInputs:
    """One step's packed batch: what _prepare plans, _run computes and _postprocess reads."""

    batch: list[tuple[Sequence, int]]  # each sequence and how many of its tokens this step computes
    tokens: list[int]  # [N] packed token ids
    sample_rows: list[int]  # [M] packed rows whose next token is sampled
    score_rows: list[int]  # [R] packed rows of scored prompts ...
    score_targets: list[int]  # [R] ... and the prompt token each of them predicts
    parts: list[MicroBatch]  # consecutive whole sequences each, with their plan and image rows


class Engine:
    def __init__(self, model: Llama4Model, max_num_seqs: int = 64, max_step_tokens: int = 2048,
                 max_cache_tokens: int = 65536, block_size: int = DEFAULT_BLOCK_SIZE, max_model_len: int | None = None,
                 kv_tier: KVTier | None = None, max_waiting: int = 1024, max_prompt_tokens: int | None = None,
                 max_new_tokens: int | None = None, micro_batches: int | str = "auto"):
        """micro_batches: how many micro-batches a step is cut into (whole sequences each) so that one's
        remote experts overlap another's dense work; "auto": auto_micro_batches() per step."""
        need(micro_batches == "auto" or (type(micro_batches) is int and 1 <= micro_batches <= MAX_MICRO_BATCHES),
             "batching.micro_batches", micro_batches, f'"auto" or an integer from 1 to {MAX_MICRO_BATCHES}')
        self.micro_batches = micro_batches
        self.model = model
        self.kv_tier = kv_tier
        self.tokens_computed = 0  # tokens that went through the model (prefill + decode)
        self.cfg = model.cfg
        if kv_tier is not None and kv_tier.block_size != block_size:
            raise HerdInputError(f"kv tier: block_size={kv_tier.block_size} differs from the cache's {block_size}")
        self.cache = model.new_cache(max_cache_tokens, block_size, hash_seed=kv_tier.hash_seed if kv_tier else b"")
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_step_tokens, max_waiting)
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.max_prompt_tokens = max_prompt_tokens or self.max_model_len
        self.max_new_tokens = max_new_tokens  # None: only the context limit bounds max_tokens
        self.stop_ids = frozenset(self.cfg.eos_token_id)
        self._ids = itertools.count()
        self.last_step: StepStats | None = None

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- admission ----
    def validate(self, req: Request) -> None:
        """The one check of a request (add() runs it); reads only what never changes after start."""
        vocab = self.cfg.vocab_size
        if not req.prompt_ids:
            raise HerdInputError("prompt is empty; allowed: at least one token")
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise HerdInputError(f"prompt token id {bad[0]} is out of range; allowed: [0, {vocab})")
        if len(req.prompt_ids) > self.max_prompt_tokens:
            raise HerdInputError(f"prompt has {len(req.prompt_ids)} tokens; allowed: at most {self.max_prompt_tokens}")
        req.params.validate(vocab, self.max_new_tokens)
        need(0 <= req.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", req.top_logprobs,
             f"an integer from 0 to {MAX_TOP_LOGPROBS}")
        self._validate_images(req)
        total = len(req.prompt_ids) + req.params.max_tokens
        if total > self.max_model_len:
            raise HerdInputError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) = {total} "
                f"exceeds the context limit {self.max_model_len}")
        if total > self.cache.num_blocks * self.cache.block_size:
            raise HerdInputError(f"prompt + max_tokens = {total} exceeds the KV cache size "
                                 f"{self.cache.num_blocks * self.cache.block_size}")

    def _validate_images(self, req: Request) -> None:
        model = self.model
        patch = model.image_token_id
        slots = sum(1 for t in req.prompt_ids if t == patch) if patch is not None else 0
        if not req.images:
            if slots and model.vision is not None:
                raise HerdInputError(f"prompt has {slots} image patch tokens and no images; allowed: one image per "
                                     "<|image|> placeholder")
            return
        if model.vision is None:
            raise HerdInputError("this model has no vision tower; allowed: text prompts")
        vc = model.vision.cfg
        for i, img in enumerate(req.images):  # checked here: a bad tensor must not reach the step of everyone
            want = (img.num_tiles, vc.num_channels, vc.image_size, vc.image_size)
            if not isinstance(img.pixels, torch.Tensor) or tuple(img.pixels.shape) != want:
                raise HerdInputError(f"images[{i}] has pixels of shape {list(getattr(img.pixels, 'shape', []))}; "
                                     f"expected {list(want)} for {img.tiles[0]} x {img.tiles[1]} tiles")
            if not img.pixels.is_floating_point() or not torch.isfinite(img.pixels).all():
                raise HerdInputError(f"images[{i}] must hold finite floating-point pixels")
        per_tile = vc.tokens_per_tile
        wanted = sum(img.num_tiles for img in req.images) * per_tile
        if slots != wanted:
            raise HerdInputError(f"prompt has {slots} image patch tokens; its {len(req.images)} images need {wanted}")

    def add(self, req: Request) -> Sequence:
        """Check and queue a request; HerdInputError if it is invalid, QueueFull if the queue is."""
        self.validate(req)
        req.params = req.params.normalized()
        seq = Sequence(next(self._ids), req, list(req.prompt_ids), req.params.make_generator())
        if req.images:
            self._place_images(seq)
        self.scheduler.add(seq)
        return seq

    def _place_images(self, seq: Sequence) -> None:
        """Where each image's features go, and the salt of every block they touch (its KV depends on them)."""
        per_tile, bs = self.model.vision.cfg.tokens_per_tile, self.cache.block_size
        seq.image_positions = [i for i, t in enumerate(seq.tokens) if t == self.model.image_token_id]
        at = 0
        for img in seq.request.images:
            rows = seq.image_positions[at : at + img.num_tiles * per_tile]
            at += len(rows)
            for block in sorted({p // bs for p in rows}):
                seq.block_salts[block] = seq.block_salts.get(block, b"") + img.digest

    def _encode_images(self, batch: list[tuple[Sequence, int]]) -> None:
        """Run the vision tower once over every tile of the step's sequences that start their images now
        (features are kept on the sequence, across chunks and preemption)."""
        todo = [seq for seq, _ in batch if seq.image_positions and seq.image_features is None
                and seq.image_positions[-1] >= seq.num_computed]  # all of it loaded from the KV tier: no need
        if not todo:
            return
        tiles = [img.pixels for seq in todo for img in seq.request.images]
        features = self.model.vision(torch.cat(tiles).to(self.model.device))  # [T, tokens_per_tile, H]
        at = 0
        for seq in todo:
            count = sum(img.num_tiles for img in seq.request.images)
            seq.image_features = features[at : at + count].reshape(-1, self.cfg.hidden_size)
            at += count

    def _image_rows(self, seq: Sequence, start: int, n: int, row: int) -> tuple[list[int], list[int]]:
        """Packed rows of this step's chunk [start, start + n) that take image features, and their feature index."""
        if not seq.image_positions or start >= seq.num_prompt:
            return [], []
        index = [k for k, p in enumerate(seq.image_positions) if start <= p < start + n]
        return [row + seq.image_positions[k] - start for k in index], index

    def cache_usage(self) -> float:
        """Fraction of the in-memory KV cache's blocks in use (of the scarcest layer kind)."""
        return 1.0 - self.cache.num_free_blocks() / self.cache.num_blocks

    def abort(self, seq_id: int) -> None:
        for seq in (*self.running, *self.waiting):
            if seq.id == seq_id and not seq.finished:
                seq.finish_reason = "abort"
        self.scheduler.reap()

    # ---- one step: plan, run, postprocess ----
    def step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule(admit=self._admit)
        if not batch:
            if self.waiting:
                raise CacheFull("kv cache cannot hold the next waiting request")
            return []
        work = self._prepare(batch)
        try:
            logits, scores, routes = self._run(work)
        except RowsRefused as exc:  # some sequence's rows: find it, the others get their tokens
            events = self._isolate(batch, exc)
        except Exception as exc:  # the step's sequences fail; every other one goes on
            events = _fail_step(batch, exc)
        else:
            events = self._postprocess(work, logits, scores, routes)
        self.scheduler.reap()
        return events

    def _isolate(self, batch: list[tuple[Sequence, int]], refused: RowsRefused) -> list[TokenEvent]:
        """The step of a refused batch, bisected: each half of a refused group runs apart (prepare,
        run, and postprocess when it passes) until a refused group is one sequence, which fails
        alone with its refusal. A refused attempt leaves nothing behind: its KV writes lie at the
        positions a re-run writes again (layer by layer, before attending to them), and whatever a
        step publishes or advances (KV tier saves, chunked blocks released, num_computed, prompt
        logprobs, samplers) happens only in the _postprocess of a run that passed. At most
        ISOLATION_RUNS_PER_HALVING * ceil(log2 B) re-runs; a failure of another kind on the way
        ends the search. What is left unresolved fails as a whole step does (retryable)."""
        events, todo = [], [(batch, refused)]  # refused groups, each with its refusal
        budget = ISOLATION_RUNS_PER_HALVING * math.ceil(math.log2(len(batch))) if len(batch) > 1 else 0
        stop: Exception | None = None  # a failure that is not a refusal: the cluster's, not a sequence's
        while todo:
            group, exc = todo.pop()
            if len(group) == 1:
                group[0][0].fail(f"the experts refused this sequence's rows: {exc}")
                events.append(TokenEvent(group[0][0], None, None))
                continue
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                if stop is not None or budget <= 0:
                    events += _fail_step(half, stop or exc)
                    continue
                budget -= 1
                work = self._prepare(half)
                try:
                    result = self._run(work)
                except RowsRefused as again:
                    todo.append((half, again))
                except Exception as other:
                    stop = other
                    events += _fail_step(half, other)
                else:
                    events += self._postprocess(work, *result)
        return events

    def _admit(self, seq: Sequence) -> None:
        if self.kv_tier is not None and not seq.request.prompt_logprobs:
            seq.num_computed = seq.num_cached = self._load_from_tier(seq)

    def _prepare(self, batch: list[tuple[Sequence, int]]) -> StepInputs:
        """Pack the step's tokens (their blocks are ensured) and choose the rows that want logits."""
        entries, tokens, sample_rows, score_rows, score_targets, row = [], [], [], [], [], 0
        image_rows, image_features = [], []
        self._encode_images(batch)
        for seq, n in batch:
            start = seq.num_computed
            entries.append((seq.id, start, n))
            tokens.extend(seq.tokens[start : start + n])
            rows, index = self._image_rows(seq, start, n, row)
            if rows:
                image_rows.extend(rows)
                image_features.append(seq.image_features[index])
            if seq.request.prompt_logprobs and start < seq.num_prompt:
                for j in range(n):  # row j predicts the prompt token at start + j + 1
                    if start + j + 1 < seq.num_prompt:
                        score_rows.append(row + j)
                        score_targets.append(seq.tokens[start + j + 1])
            elif start + n == len(seq.tokens):
                sample_rows.append(row + n - 1)
            row += n
        parts, device = [], self.model.device
        features = torch.cat(image_features) if image_rows else None
        for first, end in split_batch([n for _, n in batch], self._num_micro_batches(batch)):
            lo, hi = sum(n for _, n in batch[:first]), sum(n for _, n in batch[:end])
            at = [k for k, r in enumerate(image_rows) if lo <= r < hi]
            images = (torch.tensor([image_rows[k] - lo for k in at], dtype=torch.long, device=device),
                      features[at]) if at else None
            parts.append(MicroBatch(torch.tensor(tokens[lo:hi], device=device), self.cache.plan(entries[first:end]),
                                    images))
        return StepInputs(batch, tokens, sample_rows, score_rows, score_targets, parts)

    def _num_micro_batches(self, batch: list[tuple[Sequence, int]]) -> int:
        if self.micro_batches != "auto":
            return self.micro_batches
        return auto_micro_batches(getattr(self.model.moe, "is_remote", False), self.model.device, len(batch),
                                  sum(n for _, n in batch))

    def _run(self, work: StepInputs) -> tuple[torch.Tensor, torch.Tensor, dict[int, Route]]:
        """The forward pass: fp32 logits [M, V] of the sample rows, log-probabilities [R] of the
        scored prompt tokens (computed chunk by chunk: no [R, V] copy), each MoE layer's route."""
        device = self.model.device
        h, routes = self.model.hidden_states_split(work.parts, self.cache)
        logits = self.model.logits(h, torch.tensor(work.sample_rows, dtype=torch.long, device=device))
        scores = torch.empty(0)
        if work.score_rows:
            scores = self.model.token_logprobs(h, torch.tensor(work.score_rows, dtype=torch.long, device=device),
                                               torch.tensor(work.score_targets, dtype=torch.long, device=device))
        self.last_step = StepStats(len(work.batch), len(work.tokens), sum(1 for _, n in work.batch if n == 1),
                                   len(work.parts))
        self.tokens_computed += len(work.tokens)
        return logits, scores, routes

    def _postprocess(self, work: StepInputs, logits: torch.Tensor, scores: torch.Tensor,
                     routes: dict[int, Route]) -> list[TokenEvent]:
        """Prompt logprobs, KV tier saves, block release, sampling, stop checks, route traces.
        A sequence whose logits are not finite, or whose sampling fails, fails alone."""
        log_z = torch.logsumexp(logits, dim=-1)  # [M]: log p(t) = logit[t] - log_z, no [M, V] copy
        greedy = torch.argmax(logits, dim=-1).tolist()
        finite = torch.isfinite(log_z).tolist()
        scores = scores.tolist()
        sample_of = {r: i for i, r in enumerate(work.sample_rows)}
        events, row, k = [], 0, 0
        for seq, n in work.batch:
            row += n
            if seq.request.prompt_logprobs and seq.num_computed < seq.num_prompt:
                if seq.num_computed == 0:
                    seq.prompt_logprobs.append(None)
                m = sum(1 for j in range(n) if seq.num_computed + j + 1 < seq.num_prompt)
                seq.prompt_logprobs.extend(scores[k : k + m])
                k += m
            seq.num_computed += n
            if self.kv_tier is not None:
                self._save_to_tier(seq)  # before chunked blocks are released
            self.cache.release_before(seq.id, seq.num_computed)
            if seq.num_computed < len(seq.tokens):
                continue  # prefill chunk, more to come
            if seq.request.params.max_tokens == 0:
                if all(map(math.isfinite, seq.prompt_logprobs[1:])):
                    seq.finish_reason = "length"
                else:
                    seq.fail("the model produced non-finite log-probabilities for this prompt")
                events.append(TokenEvent(seq, None, None))
                continue
            i = sample_of[row - 1]
            try:
                if not finite[i]:
                    raise ValueError("the model produced non-finite logits for this sequence")
                token = greedy[i] if seq.generator is None else sample(logits[i], seq.request.params, seq.generator)
            except Exception as exc:  # whatever fails in one sequence's sampling fails it alone
                seq.fail(f"sampling failed: {exc}")
                events.append(TokenEvent(seq, None, None))
                continue
            logprob = float(logits[i, token] - log_z[i])
            self._append(seq, token, logprob)
            trace = _trace(routes, row - 1) if seq.request.trace_routes else None
            top = None
            if seq.request.top_logprobs:
                values, ids = torch.topk(logits[i], seq.request.top_logprobs)
                top = [(int(t), float(v - log_z[i])) for v, t in zip(values.tolist(), ids.tolist(), strict=True)]
            events.append(TokenEvent(seq, token, logprob, trace, top))
        return events

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        seq.output_logprobs.append(logprob)
        params = seq.request.params
        if (token in params.stop_token_ids) or (not params.ignore_eos and token in self.stop_ids):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason = "length"

    # ---- the KV tier: the cache names the blocks, the tier holds them ----
    def _load_from_tier(self, seq: Sequence) -> int:
        """Load the longest cached prefix of seq.tokens into the cache; returns its length in tokens."""
        tier, cache, bs = self.kv_tier, self.cache, self.cache.block_size
        max_blocks = (len(seq.tokens) - 1) // bs  # the last prompt token is always computed
        if max_blocks <= 0 or not tier.available():
            return 0
        start = time.perf_counter()
        hashes = cache.block_hashes(seq.id, seq.tokens, max_blocks, seq.block_salts)
        n = tier.count_present(hashes, cache.anchor_kind)
        loaded: dict[tuple[int, LayerKind], torch.Tensor] = {}
        while n > 0:
            wanted = [e for e in cache.entries_needed(n) if e not in loaded]
            got = tier.get([EntryKey(hashes[i], kind, (i + 1) * bs) for i, kind in wanted])
            loaded.update((e, t) for e, t in zip(wanted, got, strict=True) if t is not None)
            bad = [i for (i, _), t in zip(wanted, got, strict=True) if t is None]
            if not bad:
                break
            n = min(bad)  # keep the verified prefix before the bad block
        if not tier.available():
            return 0
        if n == 0:
            tier.stats.misses += 1
            return 0
        if not cache.load_prefix(seq.id, n, loaded):
            return 0  # no room now: the scheduler's chunked prefill recomputes within the budget
        tier.stats.hits += 1
        tier.stats.tokens_loaded += n * bs
        tier.stats.load_seconds += time.perf_counter() - start
        return n * bs

    def _save_to_tier(self, seq: Sequence) -> None:
        """Save every full block of seq whose KV is computed and not saved yet."""
        tier, cache, end = self.kv_tier, self.cache, seq.num_computed
        if not tier.available():
            return  # retried on a later step; blocks released meanwhile are skipped, not misread
        todo = cache.unsaved_entries(seq.id, end)
        if not todo:
            cache.mark_saved(seq.id, end)
            return
        hashes = cache.block_hashes(seq.id, seq.tokens, end // cache.block_size, seq.block_salts)
        bs = cache.block_size
        entries = [(EntryKey(hashes[i], kind, (i + 1) * bs), cache.read_block(seq.id, kind, i).cpu())
                   for i, kind in todo]
        if tier.put(entries):
            cache.mark_saved(seq.id, end)

    def run(self, requests: list[Request]) -> list[Sequence]:
        """Run requests to completion together (continuous batching); returns them in order."""
        seqs = [self.add(r) for r in requests]
        while self.has_work:
            self.step()
        return seqs


def auto_micro_batches(is_remote: bool, device: str, num_seqs: int, num_tokens: int) -> int:
    """The micro-batch count of micro_batches="auto" for one step (see AUTO_MICRO_BATCH_TOKENS)."""
    on_accelerator = not str(device).startswith("cpu")
    return 2 if is_remote and on_accelerator and num_seqs >= 2 and num_tokens >= AUTO_MICRO_BATCH_TOKENS else 1


def _fail_step(batch: list[tuple[Sequence, int]], exc: Exception) -> list[TokenEvent]:
    """A step that failed for a reason of the cluster's: its sequences fail, retryable."""
    for seq, _ in batch:
        seq.fail(f"model step failed: {exc}", retryable=True)
    return [TokenEvent(seq, None, None) for seq, _ in batch]


def _trace(routes: dict[int, Route], row: int) -> list[tuple[int, int, int]]:
    """(layer, expert, worker) of one packed row in every MoE layer."""
    return [(layer, int(r.expert_ids[row]), int(r.workers[row])) for layer, r in sorted(routes.items())]
