"""Block-structured KV cache that knows Llama 4's two layer kinds, and its block bookkeeping.

Tokens live in fixed-size blocks (block_size tokens, every layer of a kind sharing one block
table per sequence), so a block is the unit a second tier (Redis) stores and loads. Chunked
(RoPE) layers never look back past the start of the current attention chunk, so their blocks
are released as a sequence crosses chunk boundaries; full (NoPE) layers keep the whole history.

The cache also owns what a second tier needs to know about blocks: the chained hash that
names each full block (h_i = H(h_(i-1), token ids of block i), h_(-1) = hash_seed), which
blocks of each layer kind a reader of a prefix needs, which blocks were saved, and the
allocation of blocks for a prefix loaded from the tier.

Legend: pool k/v per layer [num_blocks, block_size, Hkv, D]; a slot is block * block_size + offset;
an entry is one block of one layer kind, [layers of kind, 2 (k, v), block_size, Hkv, D].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from llama4.config import LayerKind, ModelConfig

CHUNKED, FULL = LayerKind.CHUNKED, LayerKind.FULL
DEFAULT_BLOCK_SIZE = 16


class CacheFull(RuntimeError):
    pass


@dataclass
class BlockTable:
    first: int = 0  # index (position // block_size) of ids[0]; earlier blocks were released
    ids: list[int] = field(default_factory=list)


@dataclass
class KeyView:
    slots: torch.Tensor  # [B, S] slot of each key, 0 where empty
    positions: torch.Tensor  # [B, S] absolute position of each key, -1 where empty


@dataclass
class AttentionGroup:
    """Sequences attended together: all decodes in one group, each multi-token run alone."""

    token_index: torch.Tensor  # [B, T] rows of the packed step batch
    q_pos: torch.Tensor  # [B, T]
    keys: dict[LayerKind, KeyView]


@dataclass
class StepPlan:
    positions: torch.Tensor  # [N] absolute position of each packed token
    write_slots: dict[LayerKind, torch.Tensor]  # kind -> [N]
    groups: list[AttentionGroup]


class KVCache:
    def __init__(self, cfg: ModelConfig, max_tokens: int = 65536, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", hash_seed: bytes = b""):
        if block_size < 1 or max_tokens < block_size:
            raise ValueError(f"kv cache: block_size={block_size}, max_tokens={max_tokens} "
                             "must satisfy 1 <= block_size <= max_tokens")
        self.cfg, self.block_size, self.device, self.dtype = cfg, block_size, device, dtype
        self.chunk = cfg.attention_chunk_size
        self.layer_kind = [cfg.layer_kind(l) for l in range(cfg.num_hidden_layers)]
        self.kinds = sorted(set(self.layer_kind))
        # A reader's first lookup: every block has an entry of this kind.
        self.anchor_kind = FULL if FULL in self.kinds else CHUNKED
        self.hash_seed = hash_seed
        num_blocks = self.num_blocks = max_tokens // block_size
        self.capacity = {kind: num_blocks for kind in self.kinds}
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # torch.empty reserves address space; pages become resident only when written.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layer_kind]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layer_kind]
        self.free_blocks = {kind: list(range(num_blocks - 1, -1, -1)) for kind in self.kinds}
        self.tables: dict[object, dict[LayerKind, BlockTable]] = {}
        self._hashes: dict[object, list[bytes]] = {}  # seq -> chained hash of each full block so far
        self._saved: dict[object, int] = {}  # seq -> leading blocks already in the second tier

    # ---- allocation ----
    def num_free_blocks(self) -> int:
        """Free blocks of the scarcest layer kind."""
        return min(len(free) for free in self.free_blocks.values())

    def num_free_tokens(self) -> int:
        return self.num_free_blocks() * self.block_size

    def blocks_needed(self, seq_id, end_pos: int) -> int:
        """Blocks to add (worst kind) so that positions < end_pos are backed."""
        tables = self.tables.get(seq_id)
        need = -(-end_pos // self.block_size)
        if tables is None:
            return need
        return max(need - t.first - len(t.ids) for t in tables.values())

    def ensure(self, seq_id, end_pos: int) -> None:
        tables = self.tables.setdefault(seq_id, {kind: BlockTable() for kind in self.kinds})
        need = -(-end_pos // self.block_size)
        for kind, table in tables.items():
            missing = need - table.first - len(table.ids)
            if missing > len(self.free_blocks[kind]):
                raise CacheFull(f"kv cache full: {kind} layers need {missing} blocks, "
                                f"{len(self.free_blocks[kind])} free")
            for _ in range(missing):
                table.ids.append(self.free_blocks[kind].pop())

    def release_before(self, seq_id, next_pos: int) -> None:
        """Free chunked-layer blocks that no query at position >= next_pos can see."""
        if not self.chunk or CHUNKED not in self.kinds or seq_id not in self.tables:
            return
        table = self.tables[seq_id][CHUNKED]
        chunk_start = next_pos - next_pos % self.chunk
        while table.ids and (table.first + 1) * self.block_size <= chunk_start:
            self.free_blocks[CHUNKED].append(table.ids.pop(0))
            table.first += 1

    def free(self, seq_id) -> None:
        for kind, table in self.tables.pop(seq_id, {}).items():
            self.free_blocks[kind].extend(reversed(table.ids))
        self._hashes.pop(seq_id, None)
        self._saved.pop(seq_id, None)

    # ---- blocks and the second tier ----
    def block_hashes(self, seq_id, tokens: list[int], num_blocks: int,
                     salts: dict[int, bytes] | None = None) -> list[bytes]:
        """Chained hashes of the first num_blocks full blocks of tokens (remembered per sequence).
        salts: block -> bytes the block's KV also depends on (the digests of the images whose
        features fill its positions): the same token ids with other images never share KV."""
        hashes = self._hashes.setdefault(seq_id, [])
        prev = hashes[-1] if hashes else self.hash_seed
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            block = torch.tensor(tokens[i * bs : (i + 1) * bs], dtype=torch.int64).numpy().tobytes()
            prev = hashlib.blake2b(prev + block + (salts or {}).get(i, b""), digest_size=16).digest()
            hashes.append(prev)
        return hashes[:num_blocks]

    def entries_needed(self, num_blocks: int) -> list[tuple[int, LayerKind]]:
        """(block, kind) entries a sequence resuming after num_blocks blocks needs: the full layers'
        entry of every block, the chunked layers' entries of the chunk that holds the next position."""
        entries = [(i, FULL) for i in range(num_blocks)] if FULL in self.kinds else []
        if CHUNKED in self.kinds:
            pos = num_blocks * self.block_size
            first = (pos - pos % self.chunk) // self.block_size if self.chunk else 0
            entries += [(i, CHUNKED) for i in range(first, num_blocks)]
        return entries

    def load_prefix(self, seq_id, num_blocks: int, entries: dict[tuple[int, LayerKind], torch.Tensor]) -> bool:
        """Back the first num_blocks blocks of a new sequence with loaded KV: entries holds every
        (block, kind) that entries_needed(num_blocks) names. False (nothing changed) without room."""
        end = num_blocks * self.block_size
        if self.blocks_needed(seq_id, end) * self.block_size > self.num_free_tokens():
            return False
        self.ensure(seq_id, end)
        needed = self.entries_needed(num_blocks)
        for kind in self.kinds:
            blocks = [i for i, k in needed if k == kind]
            if blocks:
                self.write_blocks(seq_id, kind, blocks,
                                  torch.stack([entries[(i, kind)] for i in blocks]).to(self.device))
        self.release_before(seq_id, end)
        self._saved[seq_id] = num_blocks
        return True

    def unsaved_entries(self, seq_id, end: int) -> list[tuple[int, LayerKind]]:
        """(block, kind) of the full blocks below position `end` not yet saved whose KV is still in
        the cache: a chunked block released before it could be saved is skipped, never misread."""
        start, stop = self._saved.get(seq_id, 0), end // self.block_size
        tables = self.tables.get(seq_id, {})
        return [(i, kind) for i in range(start, stop) for kind in self.kinds
                if kind in tables and i >= tables[kind].first]

    def mark_saved(self, seq_id, end: int) -> None:
        """Every full block below position `end` is in the second tier (or was skipped)."""
        self._saved[seq_id] = max(self._saved.get(seq_id, 0), end // self.block_size)

    # ---- addressing ----
    def _slots(self, table: BlockTable, start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        if start // bs < table.first:
            raise IndexError(f"kv cache: block {start // bs} was released (first resident block {table.first})")
        ids = torch.tensor(table.ids[start // bs - table.first : (end - 1) // bs - table.first + 1], dtype=torch.long)
        slots = (ids[:, None] * bs + torch.arange(bs)).flatten()
        offset = start - (start // bs) * bs
        return slots[offset : offset + end - start]

    def _key_start(self, kind: LayerKind, first_query_pos: int) -> int:
        if kind == CHUNKED:
            return first_query_pos - first_query_pos % self.chunk
        return 0

    def plan(self, entries: list[tuple[object, int, int]]) -> StepPlan:
        """entries: (seq_id, start position, number of new tokens), in packed order.
        Blocks for the new tokens must already be ensured."""
        positions, write = [], {kind: [] for kind in self.kinds}
        decodes, groups, row = [], [], 0
        for seq_id, start, n in entries:
            positions.append(torch.arange(start, start + n))
            for kind in self.kinds:
                write[kind].append(self._slots(self.tables[seq_id][kind], start, start + n))
            if n == 1:
                decodes.append((row, seq_id, start, n))
            else:
                groups.append(self._group([(row, seq_id, start, n)]))
            row += n
        if decodes:
            groups.insert(0, self._group(decodes))
        return StepPlan(
            positions=torch.cat(positions).to(self.device),
            write_slots={k: torch.cat(v).to(self.device) for k, v in write.items()},
            groups=groups,
        )

    def _group(self, members: list[tuple[int, object, int, int]]) -> AttentionGroup:
        token_index = torch.stack([torch.arange(row, row + n) for row, _, _, n in members])
        q_pos = torch.stack([torch.arange(start, start + n) for _, _, start, n in members])
        keys = {}
        for kind in self.kinds:
            spans = [(self._key_start(kind, start), start + n, seq_id) for _, seq_id, start, n in members]
            s = max(end - begin for begin, end, _ in spans)
            slots = torch.zeros(len(members), s, dtype=torch.long)
            kpos = torch.full((len(members), s), -1, dtype=torch.long)
            for b, (begin, end, seq_id) in enumerate(spans):
                slots[b, : end - begin] = self._slots(self.tables[seq_id][kind], begin, end)
                kpos[b, : end - begin] = torch.arange(begin, end)
            keys[kind] = KeyView(slots.to(self.device), kpos.to(self.device))
        return AttentionGroup(token_index.to(self.device), q_pos.to(self.device), keys)

    # ---- data ----
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, Hkv, D] for the packed tokens of this step."""
        flat_k, flat_v = self._flat(layer)
        flat_k[slots], flat_v[slots] = k, v

    def layers_of(self, kind: LayerKind) -> list[int]:
        return [l for l, k in enumerate(self.layer_kind) if k == kind]

    def block_slots(self, seq_id, kind: LayerKind, block: int) -> torch.Tensor:
        bs = self.block_size
        return self._slots(self.tables[seq_id][kind], block * bs, (block + 1) * bs)

    def read_block(self, seq_id, kind: LayerKind, block: int) -> torch.Tensor:
        """[layers of kind, 2 (k, v), block_size, Hkv, D] for one block of a sequence."""
        slots = self.block_slots(seq_id, kind, block)
        return torch.stack([torch.stack([k[slots], v[slots]]) for k, v in map(self._flat, self.layers_of(kind))])

    def write_blocks(self, seq_id, kind: LayerKind, blocks: list[int], data: torch.Tensor) -> None:
        """data [len(blocks), layers of kind, 2, block_size, Hkv, D] into those blocks of a sequence."""
        slots = torch.cat([self.block_slots(seq_id, kind, b) for b in blocks])
        per_layer = data.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [layers, 2, blocks * block_size, Hkv, D]
        for i, l in enumerate(self.layers_of(kind)):
            self.write(l, slots, per_layer[i, 0], per_layer[i, 1])

    def gather(self, layer: int, view: KeyView) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, Hkv, D] keys and values for one attention group."""
        flat_k, flat_v = self._flat(layer)
        return flat_k[view.slots], flat_v[view.slots]

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's k and v pools addressed by slot: [num_blocks * block_size, Hkv, D]."""
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)
