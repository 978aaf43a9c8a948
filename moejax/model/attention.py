"""Grouped-query attention with RoPE, optional q/k norm and biases, over a paged KV cache.

Runs on local shards: query heads and kv heads are split over `tensor`; the output projection
gives partial sums that are reduced over the mesh axes splitting `heads`. When a model has fewer
kv heads than the tensor size, the loader repeats each kv head so every tensor shard holds the
one kv head its query heads read (`Layout.kv_heads_per_model`).

Cache invariant: token at position p of a sequence lives in page `page_table[b, p // page_size]`
at slot `p % page_size`. Positions < 0 mark padding: nothing is written and nothing attends to it.

Isolation invariant: a row reads only cache slots it owns. The pages a row gathers include
slots past its own length (unused page-table entries point at page 0; freed pages keep an earlier
owner's values, possibly NaN), and a masked probability of 0 times a NaN value is still NaN; so
values at positions past the row's last query position are zeroed before any arithmetic. The native
CPU kernel (`moejax.native.paged_attention`) reads, for each query, only the slots at positions up
to its own, so nothing else reaches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import native
from moejax.config import ModelConfig
from moejax.model import paged_attention
from moejax.model.layers import apply_rope, at_layer, declare, project, rms_norm
from moejax.sharding import Parallelism

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax rather than NaN


class Attention(nnx.Module):
    """Self-attention weights of every layer, stacked on a leading `layers` axis (split over `stage`)."""

    def __init__(self, cfg: ModelConfig, par: Parallelism, num_layers: int, num_kv_heads: int, dtype):
        L, D, N, K, H = num_layers, cfg.hidden_size, cfg.num_heads, num_kv_heads, cfg.head_dim
        self.cfg, self.par = cfg, par
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

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP):
        """Attention of local layer `layer` for new tokens x_BTD at positions pos_BT.

        Args:
          cache: None (attend within x only) or (k_pool, v_pool) of the stage's layers, each
            [L_local, P, page_size, K, H] local; layer `layer`'s pages are written and read in place.
          page_table_BP: [B, pages per sequence] local page ids (ignored without a cache).

        Returns:
          (y_BTD reduced over the tensor axis, updated cache).
        """
        cfg = self.cfg
        local = lambda p: at_layer(p, layer)  # noqa: E731
        with jax.named_scope("attn/qkv"):
            q_BTNH, k_BTKH, v_BTKH = (project(x_BTD, w, layer) for w in (self.wq, self.wk, self.wv))
            if cfg.qkv_bias:
                q_BTNH, k_BTKH, v_BTKH = (q_BTNH + local(self.bq), k_BTKH + local(self.bk),
                                          v_BTKH + local(self.bv))
            if cfg.qk_norm:
                q_BTNH = rms_norm(q_BTNH, local(self.q_norm), cfg.rms_norm_eps)
                k_BTKH = rms_norm(k_BTKH, local(self.k_norm), cfg.rms_norm_eps)
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        if cache is None:
            with jax.named_scope("attn/core"):
                o_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, cfg.sliding_window)
        else:
            with jax.named_scope("attn/cache"):
                # Write the new tokens into the pools in place, then read the sequence's pages.
                # (Each variant here was checked for whole-pool copies in the compiled HLO: reading
                # the old pool before the write, or reshaping the pool's unit stage axis away
                # before the scatter, made XLA:CPU copy every pool every step.)
                cache = tuple(_write_pages(pool, layer, new, pos_BT, page_table_BP) for pool, new in
                              zip(cache, (k_BTKH, v_BTKH), strict=True))
            with jax.named_scope("attn/core"):
                o_BTNH = _cached_attention(q_BTNH, cache, layer, page_table_BP, pos_BT, cfg.sliding_window)
        with jax.named_scope("attn/out"):
            # (N, H) contracted as one axis on both sides: as two dims, XLA:CPU transposed the (large)
            # weight instead, a copy of wo per layer per step.
            y_BTD = self.par.psum(project(o_BTNH, self.wo, layer, contract=2), "heads")
            if cfg.o_bias:
                y_BTD = y_BTD + local(self.bo)
        return y_BTD, cache


def _cached_attention(q_BTNH, cache, layer, page_table_BP, pos_BT, window):
    """Attention of the new queries over their rows' cached pages (the new tokens already written).

    Chosen by `choose_paged_attention` from the mesh's platform: on CPU in float32 the native kernel reads each
    query's own keys in place (`moejax.native`); on GPU the Pallas kernel does (`moejax.model.paged_attention`);
    else the row's whole page window is gathered, and the slots past the row's last position, which are not its
    own (stale or another's), are zeroed: they must not reach the arithmetic, not even as 0 * value (isolation
    invariant).
    """
    kind = choose_paged_attention(native.platform(q_BTNH), native.runs(q_BTNH, *cache), cache[0].shape)
    if kind == "native":
        return native.paged_attention(q_BTNH, *cache, layer, page_table_BP, pos_BT, window)
    if kind == "pallas":
        return paged_attention.paged_attention(q_BTNH, cache, layer, page_table_BP, pos_BT, window)
    k_BCKH, v_BCKH = (_gather_pages(pool, layer, page_table_BP) for pool in cache)
    kpos_BC = jnp.broadcast_to(jnp.arange(k_BCKH.shape[1], dtype=jnp.int32), k_BCKH.shape[:2])
    owned_BC = kpos_BC <= jnp.max(pos_BT, axis=1, keepdims=True)
    k_BCKH, v_BCKH = (jnp.where(owned_BC[..., None, None], a, 0) for a in (k_BCKH, v_BCKH))
    return attend(q_BTNH, k_BCKH, v_BCKH, pos_BT, kpos_BC, window)


def choose_paged_attention(platform: str, native_ok: bool, pool_shape) -> str:
    """Which paged attention runs: "native" (CPU kernels, float32), "pallas" (GPU, pages and head dim powers of two
    >= 16) or "xla" (gather the page window; everywhere). The one place this is decided."""
    _, _, page_size, _, head_dim = pool_shape
    if platform == "cpu" and native_ok:
        return "native"
    if platform == "gpu" and paged_attention.supported(page_size, head_dim):
        return "pallas"
    return "xla"


def attend(q_BTNH, k_BCKH, v_BCKH, qpos_BT, kpos_BC, window: int | None = None):
    """Causal GQA over keys at positions kpos_BC (< 0: absent); scores and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BCKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTC = jnp.einsum("BTKGH,BCKH->BKGTC", q_BTKGH, k_BCKH, preferred_element_type=jnp.float32)
    s_BKGTC = s_BKGTC * (H**-0.5)
    qpos, kpos = qpos_BT[:, :, None], kpos_BC[:, None, :]
    mask_BTC = (kpos <= qpos) & (kpos >= 0)
    if window:
        mask_BTC &= qpos - kpos < window
    s_BKGTC = jnp.where(mask_BTC[:, None, None], s_BKGTC, _MASKED)
    p_BKGTC = jax.nn.softmax(s_BKGTC, axis=-1).astype(v_BCKH.dtype)
    o_BTKGH = jnp.einsum("BKGTC,BCKH->BTKGH", p_BKGTC, v_BCKH)
    return o_BTKGH.reshape(B, T, N, H)


def _write_pages(pool_LPsKH, layer, new_BTKH, pos_BT, page_table_BP):
    _, num_pages, page_size = pool_LPsKH.shape[:3]
    block = jnp.clip(pos_BT // page_size, 0, page_table_BP.shape[1] - 1)
    page_BT = jnp.take_along_axis(page_table_BP, block, axis=1)
    # Padding, and a page id outside [0, num_pages) (never wrapped onto another row's page): dropped.
    page_BT = jnp.where((pos_BT >= 0) & (page_BT >= 0) & (page_BT < num_pages), page_BT, num_pages)
    return pool_LPsKH.at[layer, page_BT, pos_BT % page_size].set(new_BTKH.astype(pool_LPsKH.dtype), mode="drop")


def _gather_pages(pool_LPsKH, layer, page_table_BP):
    """The row's pages of one layer, [B, pages * page_size, K, H]: one gather (never a copy of the pool). A page id
    outside [0, pages) reads NaN (never another page): attended, it makes the row's logits non-finite, which the
    engine reports as that request's error."""
    B, MP = page_table_BP.shape
    _, _, ps, K, H = pool_LPsKH.shape
    pages = jnp.asarray(pool_LPsKH).at[layer, page_table_BP].get(mode="fill", fill_value=jnp.nan,
                                                                 wrap_negative_indices=False)
    return pages.reshape(B, MP * ps, K, H)
