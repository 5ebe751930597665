"""Prometheus metrics of the router: routed tokens per layer and expert, worker RPC latency,
retries, rerouted rows, hedged exchanges and workers that stopped answering, and the pushed
placement (dispatch: direct: its watchers, its version, refused load reports). Counts the router
keeps (with those attention services report) are read when Prometheus scrapes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router_svc.push import published

_RPC_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class RouterMetrics:
    def __init__(self, servicer):
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram("herd:worker_rpc_seconds", "One RunExperts exchange with an expert worker.",
                                     ["worker"], buckets=_RPC_SECONDS, registry=self.registry)
        self.rerouted_rows = Counter("herd:rerouted_rows", "Rows sent again to another replica after a worker "
                                     "failed.", registry=self.registry)
        self.placement_reports_refused = Counter("herd:placement_reports_refused", "Load reports from attention "
                                                 "services (dispatch: direct) refused as malformed; nothing of "
                                                 "them was counted.", registry=self.registry)
        self.registry.register(_Sampled(servicer))


class _Sampled:
    def __init__(self, servicer):
        self.sv = servicer

    def collect(self):
        routed = CounterMetricFamily("herd:routed_tokens", "Rows the gate routed to each expert.",
                                     labels=["layer", "expert"])
        for layer, counts in sorted(self.sv.tokens_per_expert.items()):
            for expert, n in enumerate(counts.tolist()):
                routed.add_metric([str(layer), str(expert)], n)
        yield routed
        yield CounterMetricFamily("herd:route_requests", "Route calls (one per MoE layer per step).",
                                  value=self.sv.routes)
        coalescer = getattr(self.sv, "coalescer", None)
        if coalescer is not None:
            yield CounterMetricFamily("herd:route_dispatches", "Dispatches of Route exchanges to the workers: one per "
                                      "exchange, or one per batch of exchanges coalesced.", value=coalescer.batches)
            yield CounterMetricFamily("herd:coalesced_route_requests", "Route exchanges dispatched together with "
                                      "others for the same layer (at the router at the same moment).",
                                      value=coalescer.coalesced)
        yield CounterMetricFamily("herd:route_retries", "Route calls that re-sent rows after a worker failed.",
                                  value=self.sv.retries)
        yield CounterMetricFamily("herd:hedged_exchanges", "RunExperts exchanges given up as overdue (their worker "
                                  "stopped answering) whose rows went to a replica.", value=self.sv.hedges)
        rpcs = CounterMetricFamily("herd:worker_rpcs", "RunExperts exchanges per worker.", labels=["worker"])
        rows = CounterMetricFamily("herd:worker_rows", "Rows sent to each worker.", labels=["worker"])
        healthy = GaugeMetricFamily("herd:worker_healthy", "1 if the router uses the worker, else 0.",
                                    labels=["worker"])
        overdue = GaugeMetricFamily("herd:worker_overdue", "1 while the worker has stopped answering (an "
                                    "exchange overdue past its bound) and has not answered since, else 0.",
                                    labels=["worker"])
        bound = GaugeMetricFamily("herd:worker_overdue_bound_seconds", "How long an exchange with the worker may "
                                  "go unanswered before it is overdue (from its recent latency).", labels=["worker"])
        for w in list(self.sv.placement.workers.values()):
            rpcs.add_metric([str(w.index)], w.rpcs)
            rows.add_metric([str(w.index)], w.rows)
            healthy.add_metric([str(w.index)], 1 if w.healthy else 0)
            overdue.add_metric([str(w.index)], 1 if w.overdue_since else 0)
            bound.add_metric([str(w.index)], w.latency.bound())
        yield from (rpcs, rows, healthy, overdue, bound)
        state = published(self.sv)
        yield GaugeMetricFamily("herd:placement_watchers", "Attention services watching the placement table "
                                "(dispatch: direct).", value=state.watchers)
        yield GaugeMetricFamily("herd:placement_table_version", "Version of the placement table last pushed "
                                "(0: none yet).", value=state.version)
