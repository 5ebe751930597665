"""A steady load on a cluster for the fault tests: streams threads, each sending its prompts one
request after another until stopped; every request is recorded as (stream, prompt index, start,
end, tokens or the exception), so a test can assert that none failed and none changed a token."""
from __future__ import annotations

import threading
import time

from herd.client import Client


class Load:
    def __init__(self, address: str, prompts: list[list[int]], streams: int, max_tokens: int):
        self.address, self.prompts, self.streams, self.max_tokens = address, prompts, streams, max_tokens
        self.done: list[tuple] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(streams)]

    def _run(self, stream: int) -> None:
        client = Client(self.address, timeout=120)
        n = 0
        while not self._stop.is_set():
            i = (stream + n * self.streams) % len(self.prompts)
            n += 1
            start = time.monotonic()
            try:
                got = [t for msg in client.generate(ids=self.prompts[i], max_tokens=self.max_tokens, ignore_eos=True)
                       for t in msg.token_ids]
            except Exception as exc:  # recorded: the tests assert there are none
                got = exc
            self.done.append((stream, i, start, time.monotonic(), got))
        client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)
