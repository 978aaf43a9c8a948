"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): a compressed KV latent cached per token, shared by heads.

Per token and layer the cache holds the latent c (kv_lora_rank R, RMS-normed) and the decoupled rope key k_r
(qk_rope_head_dim r, rotated): R + r values for all heads together, one pool [layers, pages, page_size, 1, R + r].
Nothing in it is per head, so tensor parallelism cannot split it: under `tensor` > 1 every tensor shard holds the
whole latent of its rows (replicated over tensor, `tensor` times the bytes of a split cache; the planner counts
it the same way) while the query heads are split. That is why deployments run MLA models with data-parallel
attention (the `dp_attention` expert mode splits the pool's pages over data x expert).

Attention is computed in the latent space (weight absorption) for prefill and decode alike: the per-head key
up-projection W_uk [R, N, H] is folded into the query (q_lat = q_nope . W_uk, [N, R]), scores are
q_lat . c + q_rope . k_r over the cached entries, the probabilities average the latents (o_lat [N, R]), and the
value up-projection W_uv [R, N, v] maps o_lat to each head's value width. Per-head keys and values are never
materialised for the context: the step reads R + r values per cached token, whatever the number of heads.
(Prefill could expand K/V instead, fewer FLOPs for long chunks; absorbed everywhere is one exact path.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model.attention import attend, cached_attention, with_window, write_pages
from moejax.model.layers import at_layer, declare, declare_weight, project, rms_norm
from moejax.quant import Scheme
from moejax.sharding import Parallelism


class MLA(nnx.Module):
    """MLA weights of a stack's layers (stacked on `layers`), query heads split over `tensor`."""

    def __init__(self, cfg: ModelConfig, par: Parallelism, num_layers: int, num_kv_heads: int, dtype,
                 quant: Scheme | None = None):
        del num_kv_heads  # one latent for all heads
        L, D, N = num_layers, cfg.hidden_size, cfg.num_heads
        R, r, Hqk, Hv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_head_dim, cfg.value_head_dim
        self.cfg, self.par = cfg, par
        if cfg.q_lora_rank:
            self.wq_a = declare_weight((L, D, cfg.q_lora_rank), ("layers", "embed", "latent"), dtype, (1,), quant)
            self.q_a_norm = declare((L, cfg.q_lora_rank), ("layers", "latent"), dtype)
            self.wq_b = declare_weight((L, cfg.q_lora_rank, N, Hqk), ("layers", "latent", "heads", "head_dim"), dtype,
                                       (1,), quant)
            if cfg.qkv_bias:
                self.bq_a = declare((L, cfg.q_lora_rank), ("layers", "latent"), dtype)
        else:
            self.wq = declare_weight((L, D, N, Hqk), ("layers", "embed", "heads", "head_dim"), dtype, (1,), quant)
        self.wkv_a = declare_weight((L, D, R + r), ("layers", "embed", "latent"), dtype, (1,), quant)
        if cfg.qkv_bias:
            self.bkv_a = declare((L, R + r), ("layers", "latent"), dtype)
        self.kv_a_norm = declare((L, R), ("layers", "latent"), dtype)
        self.wkv_b = declare((L, R, N, cfg.head_dim + Hv), ("layers", "latent", "heads", "head_dim"), dtype)
        self.wo = declare_weight((L, N, Hv, D), ("layers", "heads", "head_dim", "embed"), dtype, (1, 2), quant)
        if cfg.o_bias:
            self.bo = declare((L, D), ("layers", "embed"), dtype)

    @staticmethod
    def cache_layout(cfg: ModelConfig, num_kv_heads: int) -> tuple[tuple[tuple[int, ...], tuple], ...]:
        """One pool: [layers, pages, page_size, 1, R + r], replicated over `tensor` (see the module doc)."""
        del num_kv_heads
        return (((1, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("latent", "latent")),)

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP, cache_layer=None, windowed=None):
        """As `Attention.__call__`; `cache` is the one-pool tuple of `cache_layout`."""
        cfg = self.cfg
        local = lambda p: at_layer(p, layer)  # noqa: E731
        rope_, tables = rope
        H, R = cfg.head_dim, cfg.kv_lora_rank
        with jax.named_scope("attn/q"):
            if cfg.q_lora_rank:
                c_BTQ = project(x_BTD, self.wq_a, layer)
                if cfg.qkv_bias:
                    c_BTQ = c_BTQ + local(self.bq_a)
                q_BTNK = project(rms_norm(c_BTQ, local(self.q_a_norm), cfg.rms_norm_eps), self.wq_b, layer)
            else:
                q_BTNK = project(x_BTD, self.wq, layer)
            q_rope_BTNr = rope_.apply(q_BTNK[..., H:], *tables)
        with jax.named_scope("attn/latent"):
            kv_BTE = project(x_BTD, self.wkv_a, layer)  # E = R + r
            if cfg.qkv_bias:
                kv_BTE = kv_BTE + local(self.bkv_a)
            latent_BTR = rms_norm(kv_BTE[..., :R], local(self.kv_a_norm), cfg.rms_norm_eps)
            k_rope_BTr = rope_.apply(kv_BTE[..., None, R:], *tables)[:, :, 0]
            entry_BT1E = jnp.concatenate([latent_BTR, k_rope_BTr], axis=-1)[:, :, None, :]
        wkv_b_RNK = local(self.wkv_b)
        with jax.named_scope("attn/absorb"):
            q_lat_BTNR = jnp.einsum("BTNH,RNH->BTNR", q_BTNK[..., :H], wkv_b_RNK[..., :H])
            q_BTNE = jnp.concatenate([q_lat_BTNR, q_rope_BTNr.astype(q_lat_BTNR.dtype)], axis=-1)
        scale = cfg.qk_head_dim ** -0.5 * rope_.softmax_scale
        if cache is None:
            with jax.named_scope("attn/core"):
                o_BTNR = with_window(cfg.sliding_window, windowed, lambda w: attend(
                    q_BTNE, entry_BT1E, entry_BT1E[..., :R], pos_BT, pos_BT, w, scale))
        else:
            cache_layer = layer if cache_layer is None else cache_layer
            with jax.named_scope("attn/cache"):
                pool = write_pages(cache[0], cache_layer, entry_BT1E, pos_BT, page_table_BP)
                cache = (pool,)
            with jax.named_scope("attn/core"):
                # Keys and values are the same entries (values: the latent part): the kernels read each page once.
                o_BTNR = with_window(cfg.sliding_window, windowed, lambda w: cached_attention(
                    q_BTNE, (pool, pool), cache_layer, page_table_BP, pos_BT, w, scale)[..., :R])
        with jax.named_scope("attn/out"):
            o_BTNV = jnp.einsum("BTNR,RNV->BTNV", o_BTNR, wkv_b_RNK[..., H:])
            y_BTD = self.par.psum(project(o_BTNV, self.wo, layer, contract=2), "heads")
            if cfg.o_bias:
                y_BTD = y_BTD + local(self.bo)
        return y_BTD, cache
