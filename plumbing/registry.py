"""Where expert workers publish their address, experts and Ray node, and the router looks them up.

One key per worker (JSON, no pickle) with a TTL, refreshed by the worker's heartbeat, and a
set of the worker indices, so the router reads the registry in two commands without
scanning the keyspace. A worker re-publishes on every beat: after a Redis restart the
registry is whole again within one beat, and a restarted worker's new address replaces the
old one under the same index. The registry belongs in the state Redis (never evicted), not
in the KV tier's LRU cache.
"""
from __future__ import annotations

import json
import logging
import threading

import redis

log = logging.getLogger("herd.registry")
STATE_REDIS_URL_ENV = "HERD_STATE_REDIS_URL"  # where the registry lives; Ray's processes find it in their environment
HEARTBEAT_S = 2.0  # how often a worker re-publishes itself
TTL_S = 10  # a worker silent this long drops out of the registry (the router keeps its last address)


class WorkerRegistry:
    def __init__(self, redis_url: str, cluster: str = "herd", timeout_s: float = 2.0):
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._prefix, self._index = f"herd:{cluster}:worker:", f"herd:{cluster}:workers"

    def publish(self, index: int, record: dict) -> None:
        """Publish (or refresh) worker `index`: its address, experts, Ray node and the rest of record."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._prefix + str(index), json.dumps(record), ex=TTL_S)
            pipe.sadd(self._index, index)
            pipe.execute()

    def workers(self) -> dict[int, dict]:
        """{index: record} of every worker whose registration is alive."""
        indices = sorted(int(i) for i in self._redis.smembers(self._index))
        values = self._redis.mget([self._prefix + str(i) for i in indices]) if indices else []
        return {i: json.loads(raw) for i, raw in zip(indices, values, strict=True) if raw is not None}

    def clear(self) -> None:
        indices = self._redis.smembers(self._index)
        self._redis.delete(self._index, *(self._prefix + i.decode() for i in indices))

    def heartbeat(self, index: int, record: dict, stop: threading.Event) -> threading.Thread:
        """Re-publish worker `index` every HEARTBEAT_S until stop is set; Redis outages are logged
        once and survived (the worker keeps serving, the router keeps its last known address)."""

        def beat():
            down = False
            while not stop.is_set():
                try:
                    self.publish(index, record)
                    if down:
                        log.warning("worker registry reachable again; worker %d re-published", index)
                    down = False
                except redis.RedisError as exc:
                    if not down:
                        log.warning("worker registry unreachable (%s); worker %d keeps serving", exc, index)
                    down = True
                stop.wait(HEARTBEAT_S)

        thread = threading.Thread(target=beat, name=f"registry-heartbeat-{index}", daemon=True)
        thread.start()
        return thread


def expert_span(experts: list[int]) -> str:
    """"0-63" for a contiguous shard, else "0,4,8"."""
    if experts and experts == list(range(experts[0], experts[-1] + 1)):
        return f"{experts[0]}-{experts[-1]}"
    return ",".join(map(str, experts))
