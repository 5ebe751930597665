"""Prometheus metrics of the attention service, named after vLLM's (`herd:` for `vllm:`).

Latencies and lengths are observed as the engine loop hands out events; queue depth, KV cache
use, the Redis tier's counters and (dispatch: direct) the placement table in use are read when
Prometheus scrapes. One registry per service. With dispatch: direct the expert load this
service sends is counted by the router (reported to it), as in router mode.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from attention_svc.direct_moe import DirectMoE

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKENS = tuple(2**i for i in range(0, 18))


class AttentionMetrics:
    def __init__(self, loop, kv_tier=None):
        self.registry = CollectorRegistry()
        self.loop, self.kv_tier = loop, kv_tier
        r = self.registry
        self.finished = Counter("herd:request_success", "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self.ttft = Histogram("herd:time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("herd:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("herd:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY, registry=r)
        self.prompt_len = Histogram("herd:request_prompt_tokens", "Prompt length of finished requests.",
                                    buckets=_TOKENS, registry=r)
        self.gen_len = Histogram("herd:request_generation_tokens", "Generated tokens of finished requests.",
                                 buckets=_TOKENS, registry=r)
        self.prompt_tokens = Counter("herd:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("herd:generation_tokens", "Tokens generated.", registry=r)
        self.http_internal_errors = Counter("herd:http_internal_errors",
                                            "HTTP requests failed by an unexpected error in herd (a 500), by route.",
                                            ["route"], registry=r)
        r.register(_Sampled(self))

    def on_event(self, live, ev) -> None:
        """Called on the engine thread for each event it hands to a request."""
        now = time.monotonic()
        if ev.token is not None:
            self.generation_tokens.inc()
            last = getattr(live, "last_token_at", None)
            if last is None:
                self.ttft.observe(now - live.submitted)
            else:
                self.itl.observe(now - last)
            live.last_token_at = now
        seq = ev.seq
        if seq.finished:
            self.finished.labels(seq.finish_reason).inc()
            self.e2e.observe(now - live.submitted)
            self.prompt_len.observe(seq.num_prompt)
            self.prompt_tokens.inc(seq.num_prompt)
            self.gen_len.observe(len(seq.output_ids))

    def on_abort(self, live, reason: str = "abort") -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(time.monotonic() - live.submitted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Sampled:
    """What is read at scrape time: queue depth, KV cache use, the Redis tier's counters."""

    def __init__(self, metrics: AttentionMetrics):
        self.m = metrics

    def collect(self):
        engine = self.m.loop.engine
        yield GaugeMetricFamily("herd:num_requests_running", "Sequences in the running batch.",
                                value=len(engine.running))
        yield GaugeMetricFamily("herd:num_requests_waiting", "Sequences waiting to be scheduled.",
                                value=len(engine.waiting))
        yield GaugeMetricFamily("herd:kv_cache_usage_perc", "Fraction of in-memory KV cache blocks in use (0-1).",
                                value=engine.cache_usage())
        moe = engine.model.moe
        if isinstance(moe, DirectMoE):
            yield GaugeMetricFamily("herd:placement_table_version", "Version of the router's placement table in use "
                                    "(dispatch: direct; 0: none yet).", value=moe.placement.version)
            yield CounterMetricFamily("herd:placement_tables_refused", "Placement tables from the router this "
                                      "service could not use (the last good one kept).", value=moe.tables_refused)
        tier = self.m.kv_tier
        if tier is None:
            return
        st = tier.stats
        for name, doc, value in (("hits", "Prefix blocks found in the Redis KV tier.", st.hits),
                                 ("misses", "Prefix blocks looked up and not found.", st.misses),
                                 ("tokens_loaded", "Tokens whose KV came from the tier.", st.tokens_loaded),
                                 ("read_bytes", "Bytes read from the tier.", st.bytes_read),
                                 ("written_bytes", "Bytes written to the tier.", st.bytes_written),
                                 ("load_seconds", "Time spent loading entries from the tier.", st.load_seconds),
                                 ("corrupt_entries", "Entries refused by their checksum or header.", st.corrupt),
                                 ("errors", "Redis errors (the tier is skipped, never fatal).", st.errors)):
            yield CounterMetricFamily(f"herd:kv_tier_{name}", doc, value=value)
