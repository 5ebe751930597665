"""The engine loop: the single thread that owns the engine, its model and its KV cache.

RPC handlers submit requests through a queue and read back what the engine produces. The
engine checks every request (Engine.add, on this thread) and an input error or a full queue
comes back to its handler alone. Requests are told apart by the engine's own sequence ids,
never by the client's label. A sequence that fails, fails alone (its last TokenEvent
carries the error); only an unexpected engine fault fails every live request.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from llama4.engine import Engine, QueueFull, Request, Sequence
from llama4.errors import HerdInputError

log = logging.getLogger("herd.attention")
ABORTED = object()  # put on a live request's queue when it was aborted


class Live:
    """A request the engine is working on, and where its events go (TokenEvent, an exception or ABORTED):
    a queue, or anything with put() (the HTTP API hands its events to asyncio)."""

    def __init__(self, events=None):
        self.events = events if events is not None else queue.Queue()
        self.seq: Sequence | None = None  # set by the engine thread once admitted
        self.submitted = time.monotonic()


class EngineLoop:
    def __init__(self, engine: Engine, metrics=None):
        self.engine = engine
        self.metrics = metrics  # AttentionMetrics (attention_svc.metrics), set after construction
        self.inbox: queue.Queue = queue.Queue()
        self.live: dict[int, Live] = {}  # sequence id -> its request
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=256)
        self.steps = 0
        self.last_beat = time.monotonic()  # the loop's last turn: readiness sees a stuck or dead loop
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def alive(self, stall_s: float) -> bool:
        """The loop thread runs and has turned within stall_s seconds (a step is one turn)."""
        return self.thread.is_alive() and time.monotonic() - self.last_beat < stall_s

    def submit(self, request: Request, events=None) -> Live:
        return self.submit_group([request], [events])[0]

    def submit_group(self, requests: list[Request], events: list) -> list[Live]:
        """Requests the engine admits in one turn (the n choices of one call): together they see
        the same batches every time, so a seeded call repeats exactly."""
        lives = [Live(e) for e in events]
        self.inbox.put(("add", requests, lives))
        return lives

    def abort(self, live: Live, reason: str = "abort") -> None:
        """Stop a request; reason is what its metrics count ("stop" when the HTTP API met a stop string)."""
        self.inbox.put(("abort", reason, live))

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, live = item
            if kind == "add":
                for request, one in zip(payload, live, strict=True):
                    try:
                        one.seq = self.engine.add(request)
                        self.live[one.seq.id] = one
                    except (HerdInputError, QueueFull) as exc:
                        one.events.put(exc)
            elif live.seq is not None and self.live.pop(live.seq.id, None) is not None:
                self.engine.abort(live.seq.id)
                live.events.put(ABORTED)
                if self.metrics is not None:
                    self.metrics.on_abort(live, payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            self._drain(block=not self.engine.has_work)
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # an engine fault: its requests fail; the server keeps serving
                log.exception("engine step failed")
                for seq_id, live in list(self.live.items()):
                    self.engine.abort(seq_id)
                    live.events.put(exc)
                self.live.clear()
                continue
            self.steps += 1
            stats = self.engine.last_step
            if stats and stats.num_decodes:
                self.recent_batch_sizes.append(stats.num_decodes)
            for ev in events:
                live = self.live.get(ev.seq.id)
                if live is not None:
                    if self.metrics is not None:
                        self.metrics.on_event(live, ev)
                    live.events.put(ev)
                    if ev.seq.finished:
                        del self.live[ev.seq.id]
