"""Process lifecycle: wait for SIGTERM or SIGINT, watching something meanwhile."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def wait_for_signal(check: Callable[[], str | None] | None = None, every_s: float = 1.0) -> str | None:
    """Block until SIGTERM or SIGINT (returns None) or until check(), called every every_s
    seconds, returns a reason to stop (returned). Must run on the main thread."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(every_s if check else None):
        reason = check()
        if reason:
            return reason
    return None


def serve_until_signalled(server, grace_s: float = 2.0) -> None:
    """Serve a started grpc.Server until SIGTERM or SIGINT, then stop it with a grace period."""
    wait_for_signal()
    server.stop(grace=grace_s).wait()
