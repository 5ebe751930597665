"""Process lifecycle: stop on SIGTERM or SIGINT, watching something meanwhile."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGTERM or SIGINT (main thread only). Call again after a library that
    installs its own handlers (ray.init makes SIGTERM exit with status 15) to take them back."""
    stop = stop or threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def wait_for_signal(check: Callable[[], str | None] | None = None, every_s: float = 1.0,
                    stop: threading.Event | None = None) -> str | None:
    """Block until SIGTERM or SIGINT (returns None) or until check(), called every every_s
    seconds, returns a reason to stop (returned). Must run on the main thread."""
    stop = stop_on_signals(stop)
    while not stop.wait(every_s if check else None):
        reason = check()
        if reason:
            return reason
    return None


def serve_until_signalled(server, grace_s: float = 2.0, on_stop: Callable[[], None] | None = None) -> None:
    """Serve a started grpc.Server until SIGTERM or SIGINT, then drain: on_stop() (e.g. report
    NOT_SERVING), refuse new calls and give in-flight ones grace_s to finish."""
    wait_for_signal()
    if on_stop is not None:
        on_stop()
    server.stop(grace=grace_s).wait()
