"""Look-aside placement (dispatch: direct): the router's table pushed to the attention services
that send rows to the workers themselves, and the load they report back.

The router stays the one owner of placement: it reads the registry, probes the workers, keeps
the replicas and the counts. Router.WatchPlacement streams its expert-to-worker table
(PlacementTable: every worker's address, experts and healthy and overdue flags, versioned) at
once when a watcher opens the stream and again within PUSH_CHECK_S of any change; the watcher
streams PlacementReports back, about once a second, with what it sent since the last one, which
the router adds into the counts its Status and /metrics show, so `herd status` and Prometheus
show the load in both modes. A report the router cannot take (a layer that is not a MoE layer,
a count per expert of the wrong length, a worker its table does not name, a count past
MAX_REPORT_COUNT, bytes that are not a report) is refused whole and alone: nothing of it is
added, it is logged and counted (herd:placement_reports_refused_total), and the stream and every
other exchange go on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import weakref

import grpc
import torch

from herdpb import router_pb2
from plumbing.aio import Unparseable

log = logging.getLogger("herd.router")
PUSH_CHECK_S = 0.1  # how often a watcher's stream compares the table with the one it last sent
MAX_REPORT_COUNT = 1 << 40  # any one count of a report; far above a second's (or a long outage's) honest load


class ReportRefused(ValueError):
    """A PlacementReport the router does not take (nothing of it is added)."""


class _Published:
    """One router's table as last pushed: its version and how many streams watch it."""

    def __init__(self):
        self.version, self.key, self.table, self.watchers = 0, None, None, 0

    def current(self, servicer) -> router_pb2.PlacementTable:
        """The table now; a new version if anything in it changed since it was last built."""
        workers = sorted(list(servicer.placement.workers.values()), key=lambda w: w.index)
        key = tuple((w.index, w.address, tuple(w.experts), w.healthy, bool(w.overdue_since)) for w in workers)
        if key != self.key:
            self.version += 1
            self.key = key
            self.table = router_pb2.PlacementTable(version=self.version, fingerprint=servicer.fingerprint,
                                                   num_experts=servicer.placement.num_experts)
            for index, address, experts, healthy, overdue in key:
                self.table.workers.add(index=index, address=address, experts=experts, healthy=healthy, overdue=overdue)
        return self.table


_published: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # RouterServicer -> _Published
_published_lock = threading.Lock()  # the loop (watchers) and the metrics thread both look it up


def published(servicer) -> _Published:
    """The table state of this router (made at its first use)."""
    with _published_lock:
        state = _published.get(servicer)
        if state is None:
            state = _published[servicer] = _Published()
        return state


async def watch_placement(servicer, context) -> None:
    """The body of Router.WatchPlacement, on the router's loop: push the table at once and on
    every change until the watcher goes (gRPC cancels this coroutine), reading its reports
    meanwhile."""
    state = published(servicer)
    state.watchers += 1
    reader = asyncio.ensure_future(_read_reports(servicer, context))
    sent = None
    try:
        while True:
            table = state.current(servicer)
            if table.version != sent:
                await context.write(table)
                sent = table.version
            await asyncio.sleep(PUSH_CHECK_S)
    finally:
        state.watchers -= 1
        reader.cancel()


async def _read_reports(servicer, context) -> None:
    """Add each report the watcher sends; a refused one is logged (once per reason in a row) and counted."""
    last_refusal = None
    try:
        while (report := await context.read()) is not grpc.aio.EOF:
            try:
                apply_report(servicer, report)
                last_refusal = None
            except Exception as exc:  # refused, or a bug hit by this report: it fails alone, the stream goes on
                servicer.metrics.placement_reports_refused.inc()
                why = str(exc) if isinstance(exc, ReportRefused) else f"{type(exc).__name__}: {exc}"
                if why != last_refusal:
                    log.warning("refused a placement report from %s: %s", context.peer(), why)
                last_refusal = why
    except (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError):  # the call ended: so does the push
        return


def apply_report(servicer, report: router_pb2.PlacementReport) -> None:
    """Add one report's counts into the router's (those Status and /metrics read); ReportRefused,
    with nothing added, if any part of it is malformed."""
    check_report(servicer, report)
    dispatcher, workers = servicer.dispatcher, servicer.placement.workers
    for load in report.loads:
        dispatcher.tokens_per_expert[load.layer] += torch.tensor(list(load.tokens_per_expert), dtype=torch.long)
    for w in report.workers:
        worker = workers[w.index]
        worker.rpcs += w.rpcs
        worker.rows += w.rows
        dispatcher.worker_rpcs += w.rpcs
    servicer.routes += report.routes
    dispatcher.retries += report.retries
    dispatcher.hedges += report.hedges
    dispatcher.rerouted += report.rerouted_rows
    servicer.metrics.rerouted_rows.inc(report.rerouted_rows)


def check_report(servicer, report: router_pb2.PlacementReport | Unparseable) -> None:
    """ReportRefused naming the first thing in the report the router cannot take (or why its
    bytes are not a report: reports are not answered, so one that does not parse fails alone too)."""
    if isinstance(report, Unparseable):
        raise ReportRefused(report.why)
    num_experts, layers = servicer.placement.num_experts, sorted(servicer.gates)
    counts = [("routes", report.routes), ("retries", report.retries), ("hedges", report.hedges),
              ("rerouted_rows", report.rerouted_rows)]
    seen = set()
    for load in report.loads:
        if load.layer not in servicer.gates:
            raise ReportRefused(f"loads: layer={load.layer} is not a MoE layer; allowed: {layers}")
        if load.layer in seen:
            raise ReportRefused(f"loads: layer={load.layer} appears twice")
        seen.add(load.layer)
        if len(load.tokens_per_expert) != num_experts:
            raise ReportRefused(f"loads: layer={load.layer} counts {len(load.tokens_per_expert)} experts; "
                                f"the model has {num_experts}")
        counts += [(f"loads[layer={load.layer}]", max(load.tokens_per_expert, default=0))]
    known, seen = servicer.placement.workers, set()
    for w in report.workers:
        if w.index not in known:
            raise ReportRefused(f"workers: worker {w.index} is not in the router's table; known: {sorted(known)}")
        if w.index in seen:
            raise ReportRefused(f"workers: worker {w.index} appears twice")
        seen.add(w.index)
        counts += [(f"workers[{w.index}].rpcs", w.rpcs), (f"workers[{w.index}].rows", w.rows)]
    for name, value in counts:
        if value > MAX_REPORT_COUNT:
            raise ReportRefused(f"{name}={value} is out of range; allowed: at most {MAX_REPORT_COUNT}")
