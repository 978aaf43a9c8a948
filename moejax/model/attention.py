"""Grouped-query attention with RoPE, optional q/k norm and biases, over a paged KV cache.

Runs on local shards: query heads and kv heads are split over `tensor`; the output projection
gives partial sums that are reduced over the mesh axes splitting `heads`. When a model has fewer
kv heads than the tensor size, the loader repeats each kv head so every tensor shard holds the
one kv head its query heads read (`Layout.kv_heads_per_model`).

Cache invariant: token at position p of a sequence lives in page `page_table[b, p // page_size]`
at slot `p % page_size`. Positions < 0 mark padding: nothing is written and nothing attends to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig
from moejax.model.layers import apply_rope, declare, rms_norm

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax rather than NaN


class Attention(nnx.Module):
    """Self-attention weights for all (padded) layers, stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, num_layers: int, num_kv_heads: int, dtype):
        L, D, N, K, H = num_layers, cfg.hidden_size, cfg.num_heads, num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = declare((L, D, N, H), ("layers", "embed", "heads", "head_dim"), dtype)
        self.wk = declare((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        self.wv = declare((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        self.wo = declare((L, N, H, D), ("layers", "heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.bq = declare((L, N, H), ("layers", "heads", "head_dim"), dtype)
            self.bk = declare((L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
            self.bv = declare((L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
        if cfg.o_bias:
            self.bo = declare((L, D), ("layers", "embed"), dtype)
        if cfg.qk_norm:
            self.q_norm = declare((L, H), ("layers", "head_dim"), dtype)
            self.k_norm = declare((L, H), ("layers", "head_dim"), dtype)

    def __call__(self, l: int, x_BTD, pos_BT, rope, cache, page_table_BP):
        """Attention of layer `l` (local index) for new tokens x_BTD at positions pos_BT.

        Args:
          cache: None (attend within x only) or (k_pool, v_pool), each [L, P, page_size, K, H] local.
          page_table_BP: [B, pages per sequence] local page ids (ignored without a cache).

        Returns:
          (y_BTD reduced over the tensor axis, updated cache).
        """
        cfg = self.cfg
        with jax.named_scope("attn/qkv"):
            q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq[l])
            k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wk[l])
            v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.wv[l])
            if cfg.qkv_bias:
                q_BTNH, k_BTKH, v_BTKH = q_BTNH + self.bq[l], k_BTKH + self.bk[l], v_BTKH + self.bv[l]
            if cfg.qk_norm:
                q_BTNH = rms_norm(q_BTNH, self.q_norm[l], cfg.rms_norm_eps)
                k_BTKH = rms_norm(k_BTKH, self.k_norm[l], cfg.rms_norm_eps)
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        if cache is None:
            k_BSKH, v_BSKH, kpos_BS = k_BTKH, v_BTKH, pos_BT
        else:
            with jax.named_scope("attn/cache"):
                cache = tuple(_write_pages(pool, l, new, pos_BT, page_table_BP) for pool, new in
                              zip(cache, (k_BTKH, v_BTKH), strict=True))
                k_BSKH, v_BSKH = (_gather_pages(pool, l, page_table_BP) for pool in cache)
                kpos_BS = jnp.broadcast_to(jnp.arange(k_BSKH.shape[1], dtype=jnp.int32), k_BSKH.shape[:2])
        with jax.named_scope("attn/core"):
            o_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, pos_BT, kpos_BS, cfg.sliding_window)
        with jax.named_scope("attn/out"):
            y_BTD = sharding.psum(jnp.einsum("BTNH,NHD->BTD", o_BTNH, self.wo[l]), "heads")
            if cfg.o_bias:
                y_BTD = y_BTD + self.bo[l]
        return y_BTD, cache


def attend(q_BTNH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, window: int | None = None):
    """Causal GQA over keys at positions kpos_BS (< 0: absent); scores and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    s_BKGTS = s_BKGTS * (H**-0.5)
    qpos, kpos = qpos_BT[:, :, None], kpos_BS[:, None, :]
    mask_BTS = (kpos <= qpos) & (kpos >= 0)
    if window:
        mask_BTS &= qpos - kpos < window
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, _MASKED)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


def _write_pages(pool_LPsKH, l, new_BTKH, pos_BT, page_table_BP):
    page_size = pool_LPsKH.shape[2]
    num_pages = pool_LPsKH.shape[1]
    block = jnp.clip(pos_BT // page_size, 0, page_table_BP.shape[1] - 1)
    page_BT = jnp.take_along_axis(page_table_BP, block, axis=1)
    page_BT = jnp.where(pos_BT >= 0, page_BT, num_pages)  # padding: out of range, dropped
    return pool_LPsKH.at[l, page_BT, pos_BT % page_size].set(new_BTKH.astype(pool_LPsKH.dtype), mode="drop")


def _gather_pages(pool_LPsKH, l, page_table_BP):
    B, MP = page_table_BP.shape
    _, _, ps, K, H = pool_LPsKH.shape
    return pool_LPsKH[l][page_table_BP].reshape(B, MP * ps, K, H)
