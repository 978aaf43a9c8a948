"""Paged attention as a Pallas kernel: each query reads its row's pages in place (GPU; interpret mode on CPU).

XLA's path (`attention.cached_attention`) gathers every page of a row's page window into a contiguous copy
[B, pages * page_size, K, H] per layer per step before attending; on a GPU that copy is as large as the KV the
step reads. This kernel reads the pages where they lie: one instance per (row, kv head) walks the row's page
table up to the last query position of its tile (and from the first page the sliding window can reach), loads
each page's keys and values for its kv head straight from the pool [L, P, page_size, K, H], and keeps an online
softmax (flash-decoding) over them for a tile of at most `QUERY_TILE` of the row's T x G queries (G query heads
per kv head), in float32: (row, kv head, query tile) instances, so a long prefill chunk's queries never have to
fit one instance's shared memory (a 512-token chunk of G=8 queries per kv head is 4096 rows).

Isolation invariant (as the XLA path's): slots past the row's last query position are never used, not even as
0 * value: their keys and values are zeroed before any arithmetic (a freed page may hold another row's NaN).
A padding row (all positions < 0) reads no page and returns zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moejax import manual

_MASKED = -1e30
MIN_TILE = 16  # Triton's dot: every tile dim >= 16
QUERY_TILE = 64  # queries per kernel instance (GPU): 64 x H bf16 in shared memory, 64 x H float32 accumulated


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def supported(page_size: int, head_dim: int) -> bool:
    """Whether the GPU kernel tiles these sizes (page and head dim powers of two >= 16)."""
    return all(n >= MIN_TILE and n == _pow2(n) for n in (page_size, head_dim))


def _kernel(index_ref, table_ref, qpos_ref, q_ref, k_ref, v_ref, o_ref, *, page_size: int, window: int | None,
            scale: float):
    layer, kv = index_ref[0], pl.program_id(1)
    q = q_ref[...]  # [tile, H]: a tile of the row's queries of this kv head (T x G, padded)
    qpos = qpos_ref[...]  # [tile]; < 0: padding
    last = jnp.max(qpos)
    num_pages = jnp.where(last >= 0, last // page_size + 1, 0)
    first = 0
    if window:
        lowest = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max))
        first = jnp.maximum(lowest - window + 1, 0) // page_size
    slot = jnp.arange(page_size, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry
        page = table_ref[i]
        kpos = i * page_size + slot
        owned = (kpos <= last)[:, None]
        k = jnp.where(owned, k_ref[layer, page, :, kv, :], 0)
        v = jnp.where(owned, v_ref[layer, page, :, kv, :], 0)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [R, page_size]
        mask = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] >= 0)
        if window:
            mask &= qpos[:, None] - kpos[None, :] < window
        s = jnp.where(mask, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=1), acc

    R, H = q.shape
    init = (jnp.full((R,), _MASKED, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(first, num_pages, body, init)
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


def paged_attention(q_BTNH, cache, layer, page_table_BP, pos_BT, window: int | None = None,
                    interpret: bool = False, query_tile: int | None = None):
    """Causal GQA of new queries over their rows' cached pages (the new tokens already written).

    Args:
      q_BTNH: queries (RoPE applied). cache: (k_pool, v_pool), each [L, P, page_size, K, H] (local shards).
      layer: local layer index (may be traced). page_table_BP: local page ids per row. pos_BT: query positions
        (< 0: padding). window: sliding window (None: full). interpret: Pallas' interpret mode (CPU).
      query_tile: queries per kernel instance (default: all of a row's on CPU, `QUERY_TILE` on GPU).
    Returns:
      o_BTNH in q's dtype.
    """
    k_pool, v_pool = cache
    B, T, N, H = q_BTNH.shape
    L, P, page_size, K, _ = k_pool.shape
    G = N // K
    if interpret:
        tile = query_tile or T * G
        R = -(-T * G // tile) * tile
    else:  # Triton tiles: powers of two >= 16 rows, so R is a multiple of the tile
        R = max(MIN_TILE, _pow2(T * G))
        tile = min(R, query_tile or QUERY_TILE)
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    qpos_BR = jnp.repeat(pos_BT, G, axis=1)  # row r = t * G + g
    if R > T * G:
        q_BKRH = jnp.pad(q_BKRH, ((0, 0), (0, 0), (0, R - T * G), (0, 0)))
        qpos_BR = jnp.pad(qpos_BR, ((0, 0), (0, R - T * G)), constant_values=-1)
    MP = page_table_BP.shape[1]
    whole = pl.BlockSpec((L, P, page_size, K, H), lambda b, k, r: (0, 0, 0, 0, 0))  # pages read in place
    call = pl.pallas_call(
        functools.partial(_kernel, page_size=page_size, window=window, scale=H**-0.5),
        grid=(B, K, R // tile),
        in_specs=[pl.BlockSpec((1,), lambda b, k, r: (0,)), pl.BlockSpec((None, MP), lambda b, k, r: (b, 0)),
                  pl.BlockSpec((None, tile), lambda b, k, r: (b, r)),
                  pl.BlockSpec((None, None, tile, H), lambda b, k, r: (b, k, r, 0)), whole, whole],
        out_specs=pl.BlockSpec((None, None, tile, H), lambda b, k, r: (b, k, r, 0)),
        out_shape=manual.result((B, K, R, H), q_BTNH.dtype, q_BKRH, page_table_BP, qpos_BR, k_pool, v_pool),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        name="paged_attention",
    )
    out = manual.call_kernel(call, jnp.asarray(layer, jnp.int32).reshape(1), page_table_BP.astype(jnp.int32),
                             qpos_BR.astype(jnp.int32), q_BKRH, k_pool, v_pool)
    return out[:, :, : T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
