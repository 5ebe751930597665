"""The Redis tier behind the in-memory KV cache: a prefix cache shared by every request,
attention replica and restart, and the home of conversation sessions.

Keys. Full token blocks are keyed by a chained hash: h_0 = H(model fingerprint), h_i =
H(h_(i-1), token ids of block i). Equal prefixes share keys; different models never do.

What is stored, per block and layer kind (`<hash>:full` and `<hash>:chunked`). Full (NoPE)
layers read the whole history, so a reader of a P-token prefix loads the full entry of every
block. Chunked (RoPE) layers never look back past the start of the current attention chunk,
so the reader loads chunked entries only for the blocks of the chunk that holds position P:
for Llama 4 (3 of 4 layers chunked, 8192-token chunks) a 100K-token prefix loads ~27% of the
bytes a naive cache would.

Format. A 54-byte header (magic, format version, dtype, layer kind, layers, KV heads, head
dim, block size, end position, model fingerprint, CRC-32 of the payload) and the
raw tensor bytes [layers, 2, block, Hkv, D]. No pickle. An entry that fails any check is
counted, deleted and recomputed.

Redis is a cache, not a condition of correctness: every failure falls back to recompute.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass

import redis
import torch

from llama4.engine import Sequence
from llama4.kv_cache import CHUNKED, FULL, KVCache
from llama4.wire import WIRE_DTYPES

log = logging.getLogger("herd.kv_tier")
MAGIC, VERSION = b"HKV1", 1
HEADER = struct.Struct("<4sHBBHHHII16s16s")  # 4+2+1+1+2+2+2+4+4+16+16 = 54 bytes
_DTYPE_CODES = {name: i for i, name in enumerate(sorted(WIRE_DTYPES))}
_KIND_CODES = {FULL: 0, CHUNKED: 1}
RETRY_AFTER_S = 2.0


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    tokens_loaded: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    load_seconds: float = 0.0
    corrupt: int = 0
    errors: int = 0


def _checksum(payload) -> bytes:
    """CRC-32 (corruption detection, not authentication), padded to the header's 16 bytes."""
    return zlib.crc32(payload).to_bytes(4, "little") + bytes(12)


class CorruptEntry(ValueError):
    pass


class SessionUnavailable(RuntimeError):
    """A session's history lives in Redis; without Redis the turn cannot continue it."""


class RedisKVTier:
    def __init__(self, url: str, fingerprint: str, cache: KVCache, ttl_s: int = 3600, timeout_s: float = 1.0):
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.fingerprint = bytes.fromhex(fingerprint)[:16].ljust(16, b"\0")
        self.ttl = ttl_s
        self.bs = cache.block_size
        self.chunk = cache.chunk
        self.kinds = cache.kinds
        cfg = cache.cfg
        self.dtype_name = next(n for n, d in WIRE_DTYPES.items() if d == cache.k[0].dtype)
        self.shape = {k: (len(cache.layers_of(k)), 2, self.bs, cfg.num_key_value_heads, cfg.head_dim) for k in self.kinds}
        self.stats = TierStats()
        self._down_until = 0.0
        self._lock = threading.Lock()

    # ---- keys ----
    def _chain(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes = seq.block_hashes
        prev = hashes[-1] if hashes else self.fingerprint
        for i in range(len(hashes), num_blocks):
            block = torch.tensor(seq.tokens[i * self.bs : (i + 1) * self.bs], dtype=torch.int64).numpy().tobytes()
            prev = hashlib.blake2b(prev + block, digest_size=16).digest()
            hashes.append(prev)
        return hashes[:num_blocks]

    @staticmethod
    def _key(h: bytes, kind: str) -> str:
        return f"herd:kv:{h.hex()}:{kind}"

    # ---- entries ----
    def encode(self, kind: str, end_pos: int, data: torch.Tensor) -> bytes:
        payload = data.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        layers, _, bs, hkv, d = data.shape
        digest = _checksum(payload)
        header = HEADER.pack(MAGIC, VERSION, _DTYPE_CODES[self.dtype_name], _KIND_CODES[kind], layers, hkv, d, bs,
                             end_pos, self.fingerprint, digest)
        return header + payload

    def decode(self, raw: bytes, kind: str, end_pos: int) -> torch.Tensor:
        if raw is None or len(raw) < HEADER.size:
            raise CorruptEntry("missing or truncated header")
        magic, version, dtype, kind_code, layers, hkv, d, bs, end, fp, digest = HEADER.unpack_from(raw)
        shape = self.shape[kind]
        if magic != MAGIC or version != VERSION:
            raise CorruptEntry(f"format {magic!r} v{version}")
        if dtype != _DTYPE_CODES[self.dtype_name] or kind_code != _KIND_CODES[kind] or fp != self.fingerprint:
            raise CorruptEntry("dtype, layer kind or model fingerprint mismatch")
        if (layers, 2, bs, hkv, d) != shape or end != end_pos:
            raise CorruptEntry(f"shape {(layers, 2, bs, hkv, d)} / end {end}; expected {shape} / {end_pos}")
        payload = memoryview(raw)[HEADER.size:]
        expected = torch.Size(shape).numel() * torch.tensor([], dtype=WIRE_DTYPES[self.dtype_name]).element_size()
        if len(payload) != expected or _checksum(payload) != digest:
            raise CorruptEntry("payload length or checksum mismatch")
        with warnings.catch_warnings():  # read-only view of the reply: it is only copied into the cache
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload, dtype=WIRE_DTYPES[self.dtype_name]).view(shape)

    # ---- the KVTier protocol ----
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("redis KV tier unavailable (%s); recomputing, retrying in %.0fs", exc, RETRY_AFTER_S)

    def _needed(self, n: int) -> list[tuple[int, str]]:
        entries = [(i, FULL) for i in range(n)] if FULL in self.kinds else []
        if CHUNKED in self.kinds:
            pos = n * self.bs
            first = (pos - pos % self.chunk) // self.bs if self.chunk else 0
            entries += [(i, CHUNKED) for i in range(first, n)]
        return entries

    def load_prefix(self, seq: Sequence, cache: KVCache) -> int:
        max_blocks = (len(seq.tokens) - 1) // self.bs  # the last prompt token is always computed
        if max_blocks <= 0 or not self._available():
            return 0
        start = time.perf_counter()
        hashes = self._chain(seq, max_blocks)
        anchor = FULL if FULL in self.kinds else CHUNKED
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.exists(self._key(h, anchor))
                exists = pipe.execute()
            n = next((i for i, e in enumerate(exists) if not e), max_blocks)
            blocks: dict[tuple[int, str], torch.Tensor] = {}
            while n > 0:
                needed = self._needed(n)
                with self.redis.pipeline(transaction=False) as pipe:
                    for i, kind in needed:
                        pipe.get(self._key(hashes[i], kind))
                    raws = pipe.execute()
                bad = None
                for (i, kind), raw in zip(needed, raws):
                    try:
                        blocks[(i, kind)] = self.decode(raw, kind, (i + 1) * self.bs)
                        self.stats.bytes_read += len(raw)
                    except CorruptEntry as exc:
                        if raw is not None:
                            self.stats.corrupt += 1
                            log.warning("corrupt KV entry %s (%s): deleted", self._key(hashes[i], kind), exc)
                            self.redis.delete(self._key(hashes[i], kind))
                        bad = i if bad is None else min(bad, i)
                if bad is None:
                    break
                n = bad  # keep the verified prefix before the bad block
        except redis.RedisError as exc:
            self._failed(exc)
            return 0
        if n == 0:
            self.stats.misses += 1
            return 0
        if cache.blocks_needed(seq.id, n * self.bs) * self.bs > cache.num_free_tokens():
            return 0  # no room now: the scheduler's chunked prefill recomputes within the budget
        cache.ensure(seq.id, n * self.bs)
        for kind in self.kinds:
            ids = [i for i, k in self._needed(n) if k == kind]
            if ids:
                cache.write_blocks(seq.id, kind, ids, torch.stack([blocks[(i, kind)] for i in ids]).to(cache.device))
        cache.release_before(seq.id, n * self.bs)
        seq.num_blocks_saved = n
        self.stats.hits += 1
        self.stats.tokens_loaded += n * self.bs
        self.stats.load_seconds += time.perf_counter() - start
        return n * self.bs

    def store(self, seq: Sequence, cache: KVCache, end: int) -> None:
        num_blocks = end // self.bs
        if num_blocks <= seq.num_blocks_saved or not self._available():
            return
        hashes = self._chain(seq, num_blocks)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for i in range(seq.num_blocks_saved, num_blocks):
                    for kind in self.kinds:
                        raw = self.encode(kind, (i + 1) * self.bs, cache.read_block(seq.id, kind, i).cpu())
                        pipe.set(self._key(hashes[i], kind), raw, ex=self.ttl)
                        self.stats.bytes_written += len(raw)
                pipe.execute()
            seq.num_blocks_saved = num_blocks
        except redis.RedisError as exc:
            self._failed(exc)

    def save_session(self, session_id: str, tokens: list[int], messages: list[dict] | None) -> None:
        """A conversation after a turn: its tokens and, for chat sessions, its messages."""
        record = json.dumps({"fingerprint": self.fingerprint.hex(), "tokens": tokens, "messages": messages})
        try:
            self.redis.set(f"herd:session:{session_id}", record, ex=self.ttl)
        except redis.RedisError as exc:
            self._failed(exc)

    def session(self, session_id: str) -> dict:
        """{"tokens": [...], "messages": [...] or None} of earlier turns; empty for a new session."""
        try:
            raw = self.redis.get(f"herd:session:{session_id}")
        except redis.RedisError as exc:
            self._failed(exc)
            raise SessionUnavailable(f"session store unavailable: {exc}") from None
        record = json.loads(raw) if raw is not None else {}
        if record.get("fingerprint") != self.fingerprint.hex():
            return {"tokens": [], "messages": None}
        return {"tokens": record["tokens"], "messages": record.get("messages")}
