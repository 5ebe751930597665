"""The KV entry codec: one block of one layer kind as the bytes the Redis tier stores.

A 54-byte header (magic, format version, dtype, layer kind, layers, KV heads, head dim,
block size, end position, model fingerprint, CRC-32 of the payload) and the raw tensor
bytes [layers, 2 (k, v), block, Hkv, D]. No pickle. An entry that fails any check raises
CorruptEntry; the tier counts it, deletes it and the engine recomputes.
"""
from __future__ import annotations

import struct
import warnings
import zlib

import torch

from llama4.config import LayerKind, ModelConfig
from llama4.dtypes import DTYPE_NAMES, dtype_name

MAGIC, VERSION = b"HKV1", 1
HEADER = struct.Struct("<4sHBBHHHII16s16s")  # 4+2+1+1+2+2+2+4+4+16+16 = 54 bytes
_DTYPE_CODES = {name: i for i, name in enumerate(DTYPE_NAMES)}
_KIND_CODES = {LayerKind.FULL: 0, LayerKind.CHUNKED: 1}


class CorruptEntry(ValueError):
    pass


def _checksum(payload) -> bytes:
    """CRC-32 (corruption detection, not authentication), padded to the header's 16 bytes."""
    return zlib.crc32(payload).to_bytes(4, "little") + bytes(12)


class EntryCodec:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, block_size: int, fingerprint: bytes):
        self.dtype, self.fingerprint = dtype, fingerprint
        self.dtype_code = _DTYPE_CODES[dtype_name(dtype)]
        kinds = [cfg.layer_kind(l) for l in range(cfg.num_hidden_layers)]
        self.shape = {kind: (kinds.count(kind), 2, block_size, cfg.num_key_value_heads, cfg.head_dim)
                      for kind in set(kinds)}

    def encode_entry(self, kind: LayerKind, end_pos: int, data: torch.Tensor) -> bytes:
        payload = data.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        layers, _, bs, hkv, d = data.shape
        header = HEADER.pack(MAGIC, VERSION, self.dtype_code, _KIND_CODES[kind], layers, hkv, d, bs, end_pos,
                             self.fingerprint, _checksum(payload))
        return header + payload

    def decode_entry(self, raw: bytes | None, kind: LayerKind, end_pos: int) -> torch.Tensor:
        """A read-only [layers, 2, block, Hkv, D] view of raw, or CorruptEntry naming the check."""
        if raw is None or len(raw) < HEADER.size:
            raise CorruptEntry("missing or truncated header")
        magic, version, dtype, kind_code, layers, hkv, d, bs, end, fp, digest = HEADER.unpack_from(raw)
        shape = self.shape[kind]
        if magic != MAGIC or version != VERSION:
            raise CorruptEntry(f"format {magic!r} v{version}")
        if dtype != self.dtype_code or kind_code != _KIND_CODES[kind] or fp != self.fingerprint:
            raise CorruptEntry("dtype, layer kind or model fingerprint mismatch")
        if (layers, 2, bs, hkv, d) != shape or end != end_pos:
            raise CorruptEntry(f"shape {(layers, 2, bs, hkv, d)} / end {end}; expected {shape} / {end_pos}")
        payload = memoryview(raw)[HEADER.size:]
        if len(payload) != torch.Size(shape).numel() * self.dtype.itemsize or _checksum(payload) != digest:
            raise CorruptEntry("payload length or checksum mismatch")
        with warnings.catch_warnings():  # read-only view of the reply: it is only copied into the cache
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload, dtype=self.dtype).view(shape)
