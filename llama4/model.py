"""The Llama 4 text decoder stack, written once against the MoEBackend seam.

hidden_states() takes a packed step batch (prefill chunks and decode tokens of many
sequences, concatenated) and a StepPlan from the KV cache, and hands back the final hidden
states with the route every MoE layer took; hidden_states_split() does the same for a step
cut into micro-batches, whose routed experts overlap each other's dense work; logits() turns
chosen rows into logits.
Legend: N packed tokens, H hidden, Hq/Hkv heads, D head dim, V vocabulary, M rows that want logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import apply_rope, attention, qk_norm, rms_norm, rope_inv_freq, swiglu, temperature_scale
from llama4.checkpoint import Checkpoint
from llama4.config import ModelConfig
from llama4.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, StepPlan
from llama4.moe import LocalMoE, MoEBackend, Route
from llama4.weights import DenseWeights, LayerWeights, load_experts, load_gates, load_vision

LOGPROB_CHUNK = 256  # rows of [rows, V] fp32 logits alive at once when scoring prompts


@dataclass
class MicroBatch:
    """Whole sequences of a step: their packed tokens [n], plan and image rows (local to the micro-batch)."""

    tokens: torch.Tensor
    plan: StepPlan
    images: tuple[torch.Tensor, torch.Tensor] | None = None


def _finish(pending, routes: dict[int, Route]) -> torch.Tensor:
    """h + shared + routed of one micro-batch's MoE layer (waits for the routed output)."""
    layer, routed_call, h, shared = pending
    routed = routed_call.result()
    routes[layer] = routed.route
    return h + (shared + routed.y)


def _join(hs: list[torch.Tensor], routes: list[dict[int, Route]]) -> tuple[torch.Tensor, dict[int, Route]]:
    """Micro-batches' hidden states and routes back in packed order."""
    if len(hs) == 1:
        return hs[0], routes[0]
    joined = {l: Route(torch.cat([r[l].expert_ids for r in routes]), torch.cat([r[l].workers for r in routes]))
              for l in routes[0]}
    return torch.cat(hs), joined


class Llama4Model:
    def __init__(self, cfg: ModelConfig, weights: DenseWeights, moe: MoEBackend, dtype: torch.dtype, device: str,
                 vision=None, image_token_id: int | None = None):
        self.cfg, self.w, self.moe, self.dtype, self.device = cfg, weights, moe, dtype, device
        self.vision, self.image_token_id = vision, image_token_id  # llama4.vision.VisionTower, the <|patch|> id
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)

    @classmethod
    def load(cls, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu",
             moe: MoEBackend | None = None, expert_dtype: str = "auto") -> Llama4Model:
        """moe=None loads every gate and expert here (monolithic), held as `expert_dtype` (llama4.quant)."""
        if moe is None:
            ckpt.check_experts()
            all_experts = list(range(ckpt.config.num_local_experts))
            moe = LocalMoE(load_gates(ckpt, dtype, device),
                           load_experts(ckpt, all_experts, dtype, device, expert_dtype))
        return cls(ckpt.config, DenseWeights.load(ckpt, dtype, device), moe, dtype, device,
                   load_vision(ckpt, dtype, device), ckpt.image_token_id)

    def new_cache(self, max_tokens: int = 65536, block_size: int = DEFAULT_BLOCK_SIZE,
                  hash_seed: bytes = b"") -> KVCache:
        return KVCache(self.cfg, max_tokens=max_tokens, block_size=block_size, dtype=self.dtype, device=self.device,
                       hash_seed=hash_seed)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, plan: StepPlan, cache: KVCache, logit_rows: torch.Tensor,
                images: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [N] -> fp32 logits [M, V] for the packed rows logit_rows [M]."""
        h, _ = self.hidden_states(tokens, plan, cache, images)
        return self.logits(h, logit_rows)

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor, plan: StepPlan, cache: KVCache,
                      images: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[int, Route]]:
        """tokens [N] -> final hidden states [N, H] and, per MoE layer, where each row was routed.
        images: (rows [R], features [R, H]): image features (llama4.vision) that replace those rows'
        embeddings (early fusion: every layer sees them as tokens)."""
        return self.hidden_states_split([MicroBatch(tokens, plan, images)], cache)

    @torch.inference_mode()
    def hidden_states_split(self, parts: list[MicroBatch], cache: KVCache) -> tuple[torch.Tensor, dict[int, Route]]:
        """hidden_states() of a step packed as micro-batches (whole sequences each, in packed order):
        [sum N_i, H] and the routes, as one batch would give them.

        Ping-pong: layer by layer, each micro-batch submits its routed experts and goes on to its
        shared expert, then the next micro-batch runs its attention and dense work while the
        first one's experts run; a micro-batch waits for its routed output only when its next
        layer needs it. Pending exchanges are collected in submit order."""
        hs, pending = [], [None] * len(parts)  # pending[i]: (layer, routed in flight, h, shared) of part i
        routes: list[dict[int, Route]] = [{} for _ in parts]
        for part in parts:
            h = self.w.embed[part.tokens]  # [N_i, H]
            if part.images is not None:
                h = h.clone()
                h[part.images[0]] = part.images[1].to(h.dtype)
            hs.append(h)
        try:
            for layer, lw in enumerate(self.w.layers):
                for i, part in enumerate(parts):
                    if pending[i] is not None:
                        hs[i], pending[i] = _finish(pending[i], routes[i]), None
                    h = hs[i]
                    h = h + self._attention(layer, lw, rms_norm(h, lw.input_norm, self.cfg.rms_norm_eps), part.plan,
                                            cache)
                    x = rms_norm(h, lw.post_norm, self.cfg.rms_norm_eps)
                    if self.cfg.is_moe_layer(layer):
                        routed = self.moe.submit(layer, x)  # in flight while the shared expert (and the rest) runs
                        pending[i] = (layer, routed, h, None)  # held first: collected even if swiglu fails
                        pending[i] = (layer, routed, h, swiglu(x, *lw.ffn))
                    else:
                        hs[i] = h + swiglu(x, *lw.ffn)
            for i, p in enumerate(pending):
                if p is not None:
                    hs[i], pending[i] = _finish(p, routes[i]), None
        finally:
            for p in pending:  # on failure: every exchange still answered, so a backend's stream stays paired
                if p is not None:
                    try:
                        p[1].result()
                    except Exception:  # the first failure is the one raised
                        pass
        return _join(hs, routes)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [M, V] of the hidden states h [N, H] at rows [M]."""
        out = rms_norm(h[rows], self.w.norm, self.cfg.rms_norm_eps)
        return F.linear(out, self.w.lm_head).float()

    @torch.inference_mode()
    def token_logprobs(self, h: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                       chunk: int | None = None) -> torch.Tensor:
        """log p(targets[r] | row r) [R] for hidden states h [N, H] at rows [R], chunk rows at a
        time (LOGPROB_CHUNK by default): memory grows with the chunk ([chunk, V] fp32), not with R x V."""
        chunk = chunk or LOGPROB_CHUNK
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, rows.shape[0], chunk):
            logits = self.logits(h, rows[i : i + chunk])  # [chunk, V]
            picked = logits.gather(1, targets[i : i + chunk, None])[:, 0]
            out[i : i + chunk] = picked - torch.logsumexp(logits, dim=-1)
        return out

    def _attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, plan: StepPlan, cache: KVCache) -> torch.Tensor:
        cfg, n = self.cfg, x.shape[0]
        q = F.linear(x, lw.wq).view(n, cfg.num_attention_heads, cfg.head_dim)
        k = F.linear(x, lw.wk).view(n, cfg.num_key_value_heads, cfg.head_dim)
        v = F.linear(x, lw.wv).view(n, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.uses_rope(layer):
            q, k = apply_rope(q, plan.positions, self.inv_freq), apply_rope(k, plan.positions, self.inv_freq)
            if cfg.use_qk_norm:
                q, k = qk_norm(q, cfg.rms_norm_eps), qk_norm(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            scale = temperature_scale(plan.positions, cfg.floor_scale, cfg.attn_scale)
            q = (q * scale[:, None, None]).to(q.dtype)
        kind = cfg.layer_kind(layer)
        cache.write(layer, plan.write_slots[kind], k, v)
        chunk = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        out = torch.empty_like(q)
        for group in plan.groups:
            keys, values = cache.gather(layer, group.keys[kind])
            view = group.keys[kind]
            out[group.token_index] = attention(q[group.token_index], keys, values, group.q_pos, view.positions, chunk)
        return F.linear(out.view(n, -1), lw.wo)
