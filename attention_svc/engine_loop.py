"""The engine loop: the single thread that owns the engine, its model and its KV cache.

RPC handlers submit requests through a queue and read back what the engine produces. The
engine checks every request (Engine.add, on this thread) and an input error comes back to
its handler alone; a failed step fails only the requests it held.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading

from llama4.engine import Engine, Request
from llama4.errors import HerdInputError

log = logging.getLogger("herd.attention")
ABORTED = object()  # put on a live request's queue when it was aborted


class Live:
    """A request the engine is working on, and where its events go (TokenEvent, an exception or ABORTED)."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.live: dict[str, Live] = {}
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=256)
        self.steps = 0
        threading.Thread(target=self._run, name="engine", daemon=True).start()

    def submit(self, request: Request) -> Live:
        live = Live()
        self.inbox.put(("add", request, live))
        return live

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id, None))

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, live = item
            if kind == "add":
                try:
                    self.engine.add(payload)
                    self.live[payload.request_id] = live
                except HerdInputError as exc:
                    live.events.put(exc)
            else:
                self.engine.abort(payload)
                gone = self.live.pop(payload, None)
                if gone:
                    gone.events.put(ABORTED)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            self._drain(block=not self.engine.has_work)
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # the step's requests fail; the server keeps serving
                log.exception("engine step failed")
                for rid, live in list(self.live.items()):
                    self.engine.abort(rid)
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
                    live.events.put(ev)
                    if ev.seq.finished:
                        del self.live[ev.seq.id]
