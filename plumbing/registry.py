"""Where expert workers publish their address and experts, and the router looks them up.

A Redis hash per worker (JSON values, no pickle). A restarted worker publishes its new
address under the same index, so the router follows it.
"""
from __future__ import annotations

import json

import redis


class WorkerRegistry:
    def __init__(self, redis_url: str, cluster: str = "herd"):
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = f"herd:{cluster}:worker:"

    def publish(self, index: int, address: str, experts: list[int], pid: int) -> None:
        self._redis.set(self._prefix + str(index), json.dumps({"address": address, "experts": experts, "pid": pid}))

    def workers(self) -> dict[int, dict]:
        keys = sorted(self._redis.scan_iter(match=self._prefix + "*"))
        values = self._redis.mget(keys) if keys else []
        out = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is not None:
                out[int(key.decode().rsplit(":", 1)[1])] = json.loads(raw)
        return out

    def clear(self) -> None:
        for key in self._redis.scan_iter(match=self._prefix + "*"):
            self._redis.delete(key)
