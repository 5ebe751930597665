"""Progress on long work (conversion, checkpoint loading, start-up), on the terminal only.

tqdm with disable=None draws nothing when stderr is not a TTY: services under Ray, Kubernetes
and tests stay quiet, and nothing is written to their logs.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it"):
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, file=sys.stderr,
                dynamic_ncols=True)
