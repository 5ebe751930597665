"""The Redis tier behind the in-memory KV cache: a prefix cache shared by every request,
attention replica and restart. (Conversation sessions live in attention_svc.sessions.)

The KV cache (llama4.kv_cache) names the blocks (chained hashes from the model fingerprint,
so equal prefixes share keys and different models never do) and says which entries a reader
needs; this module only gets and puts entries, `herd:kv:<hash>:<kind>`, in the format of
attention_svc.kv_entry.

Entries are written once (SET NX): a key names its content, so an existing entry is never
overwritten, and a writer racing another (or holding different bytes for the same key) leaves
the first one in place; bytes_written counts only what was stored.

Redis is a cache, not a condition of correctness: every failure answers "absent", and the
tier is not called again for RETRY_AFTER_S.
"""
from __future__ import annotations

import logging
import time

import redis
import torch

from attention_svc.kv_entry import CorruptEntry, EntryCodec
from llama4.config import LayerKind, ModelConfig
from llama4.engine import EntryKey, TierStats

log = logging.getLogger("herd.kv_tier")
RETRY_AFTER_S = 2.0


class RedisKVTier:
    """The engine's KVTier, on Redis."""

    def __init__(self, url: str, fingerprint: str, cfg: ModelConfig, dtype: torch.dtype, block_size: int = 16,
                 ttl_s: int = 3600, timeout_s: float = 1.0):
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.hash_seed = bytes.fromhex(fingerprint)[:16].ljust(16, b"\0")
        self.codec = EntryCodec(cfg, dtype, block_size, self.hash_seed)
        self.block_size, self.ttl = block_size, ttl_s
        self.stats = TierStats()
        self._down_until = 0.0

    @staticmethod
    def key(block_hash: bytes, kind: LayerKind) -> str:
        return f"herd:kv:{block_hash.hex()}:{kind}"

    # ---- the KVTier protocol ----
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("redis KV tier unavailable (%s); recomputing, retrying in %.0fs", exc, RETRY_AFTER_S)

    def count_present(self, hashes: list[bytes], kind: LayerKind) -> int:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.exists(self.key(h, kind))
                exists = pipe.execute()
        except redis.RedisError as exc:
            self._failed(exc)
            return 0
        return next((i for i, e in enumerate(exists) if not e), len(hashes))

    def get(self, keys: list[EntryKey]) -> list[torch.Tensor | None]:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.getex(self.key(k.block_hash, k.kind), ex=self.ttl)  # a read keeps a hot prefix alive
                raws = pipe.execute()
        except redis.RedisError as exc:
            self._failed(exc)
            return [None] * len(keys)
        out = []
        for k, raw in zip(keys, raws, strict=True):
            try:
                out.append(self.codec.decode_entry(raw, k.kind, k.end_pos))
                self.stats.bytes_read += len(raw)
            except CorruptEntry as exc:
                out.append(None)
                if raw is not None:
                    self.stats.corrupt += 1
                    log.warning("corrupt KV entry %s (%s): deleted", self.key(k.block_hash, k.kind), exc)
                    self._delete(self.key(k.block_hash, k.kind))
        return out

    def _delete(self, key: str) -> None:
        try:
            self.redis.delete(key)
        except redis.RedisError as exc:
            self._failed(exc)

    def put(self, entries: list[tuple[EntryKey, torch.Tensor]]) -> bool:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                sizes = []
                for k, data in entries:
                    raw = self.codec.encode_entry(k.kind, k.end_pos, data)
                    pipe.set(self.key(k.block_hash, k.kind), raw, ex=self.ttl, nx=True)
                    sizes.append(len(raw))
                written = pipe.execute()  # True where stored, None where the key already held an entry
        except redis.RedisError as exc:
            self._failed(exc)
            return False
        self.stats.bytes_written += sum(n for n, ok in zip(sizes, written, strict=True) if ok)
        return True
