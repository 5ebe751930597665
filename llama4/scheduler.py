"""The scheduler: which sequences compute how many tokens in each step.

Plain Python over sequences and the KV cache's block counts (no tensors, no I/O). Running
sequences go first, oldest first; KV blocks are taken as a sequence grows, not reserved for
its worst case. When the cache cannot back a running sequence's next tokens, the newest
running sequence is preempted: its blocks are freed and it goes back to the head of the
queue, to be recomputed (or reloaded from the KV tier) when room returns. A waiting sequence
is admitted, first come first served, when its tokens so far fit above a small watermark.
The queue is bounded; beyond it add() raises QueueFull.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from llama4.kv_cache import KVCache
from llama4.sequence import Sequence

WATERMARK = 0.01  # share of the cache's blocks kept free at admission, so running sequences can grow


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should answer RESOURCE_EXHAUSTED."""


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_step_tokens: int, max_waiting: int):
        self.cache, self.max_num_seqs, self.max_step_tokens = cache, max_num_seqs, max_step_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._watermark = max(1, int(cache.num_blocks * WATERMARK))

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _room(self, seq: Sequence, end: int, keep: int = 0) -> bool:
        """Whether the cache can back seq's positions < end and still keep `keep` blocks free."""
        return self.cache.blocks_needed(seq.id, end) + keep <= self.cache.num_free_blocks()

    def schedule(self, admit: Callable[[Sequence], None]) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for this step, with blocks ensured for them. admit(seq)
        runs when a waiting sequence joins (the engine loads its cached prefix there)."""
        budget, batch = self.max_step_tokens, []
        queue, self.running = self.running, []
        while queue:
            seq = queue.pop(0)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            end = seq.num_computed + n
            while n > 0 and not self._room(seq, end) and queue:
                self.preempt(queue.pop())  # the newest running sequence gives way
            if n > 0 and not self._room(seq, end):
                self.preempt(seq)
                continue
            self.running.append(seq)
            if n > 0:
                self.cache.ensure(seq.id, end)
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # The whole prompt so far must fit above the watermark (any room at all when idle).
            if not self._room(seq, len(seq.tokens), self._watermark if self.running else 0):
                break
            self.waiting.popleft()
            admit(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            self.cache.ensure(seq.id, seq.num_computed + n)
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Drop seq's KV and put it back at the head of the queue; it recomputes when readmitted."""
        self.cache.free(seq.id)
        seq.num_computed = seq.num_cached = 0
        seq.num_preemptions += 1
        if seq.request.prompt_logprobs:
            seq.prompt_logprobs.clear()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def reap(self) -> list[Sequence]:
        """Remove finished sequences, free their blocks; returns them."""
        done = [s for s in (*self.running, *self.waiting) if s.finished]
        for seq in done:
            self.cache.free(seq.id)
        self.running = [s for s in self.running if not s.finished]
        self.waiting = deque(s for s in self.waiting if not s.finished)
        return done


def split_batch(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut a step's batch (tokens per sequence, in packed order) into at most `parts` micro-batches
    of whole, consecutive sequences with token counts as even as the boundaries allow:
    [(first sequence, end sequence)], covering every sequence once, none empty."""
    parts = max(1, min(parts, len(sizes)))
    total, cuts, at, seen = sum(sizes), [0], 0, 0
    for j in range(1, parts):
        target, last = total * j / parts, len(sizes) - (parts - j)  # every later part keeps a sequence
        # Take at least one sequence, then more while the boundary gets no farther from the target.
        while at < last and (at == cuts[-1] or abs(seen + sizes[at] - target) <= abs(seen - target)):
            seen += sizes[at]
            at += 1
        cuts.append(at)
    cuts.append(len(sizes))
    return list(zip(cuts[:-1], cuts[1:], strict=True))
