"""Grouped-query attention over a paged KV cache, and the paged-cache helpers every attention kind shares.

The GQA kind covers Mixtral, Qwen, GLM, OLMoE and gpt-oss: RoPE on all of the head or its first part
(`partial_rotary_factor`), q/k/v/o biases, q/k RMSNorm per head or over the whole projected width (OLMoE),
`clip_qkv`, attention sinks (gpt-oss) and sliding windows on every layer or on some (`sliding_layers`).
MLA, the other kind, is `moejax.model.mla`. Each kind owns its cache layout (`cache_layout`).

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

A pool may be quantized (`moejax.kv_cache.QuantizedPool`: 1-byte values and a float32 scale per (token, kv head)):
`write_pages` quantizes the new tokens, the paged attention dequantizes the pages it gathers into the queries'
dtype (`choose_paged_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kv_cache, native
from moejax.config import ModelConfig
from moejax.model import paged_attention
from moejax.model.layers import at_layer, declare, declare_weight, project, rms_norm
from moejax.quant import Scheme
from moejax.sharding import Parallelism

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax rather than NaN
CACHE_PREFIX = ("layers", "cache_pages", "page_slot")  # every pool: [layers, pages, page_size, ...]


class Attention(nnx.Module):
    """Grouped-query attention weights of a stack's layers, stacked on a leading `layers` axis (split over `stage`).

    The attention kind owns its cache layout (`cache_layout`): here a (k, v) pair of pools, each
    [layers, pages, page_size, K, H], kv heads split over `tensor` like the query heads that read them.
    """

    def __init__(self, cfg: ModelConfig, par: Parallelism, num_layers: int, num_kv_heads: int, dtype,
                 quant: Scheme | None = None):
        L, D, N, K, H = num_layers, cfg.hidden_size, cfg.num_heads, num_kv_heads, cfg.head_dim
        self.cfg, self.par = cfg, par
        self.wq = declare_weight((L, D, N, H), ("layers", "embed", "heads", "head_dim"), dtype, (1,), quant)
        self.wk = declare_weight((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype, (1,), quant)
        self.wv = declare_weight((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype, (1,), quant)
        self.wo = declare_weight((L, N, H, D), ("layers", "heads", "head_dim", "embed"), dtype, (1, 2), quant)
        if cfg.qkv_bias:
            self.bq = declare((L, N, H), ("layers", "heads", "head_dim"), dtype)
            self.bk = declare((L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
            self.bv = declare((L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
        if cfg.o_bias:
            self.bo = declare((L, D), ("layers", "embed"), dtype)
        if cfg.qk_norm and cfg.qk_norm_scope == "head":
            self.q_norm = declare((L, H), ("layers", "head_dim"), dtype)
            self.k_norm = declare((L, H), ("layers", "head_dim"), dtype)
        elif cfg.qk_norm:  # one norm over the whole projected width (OLMoE): its weight splits with the heads
            self.q_norm = declare((L, N, H), ("layers", "heads", "head_dim"), dtype)
            self.k_norm = declare((L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
        if cfg.attention_sinks:
            self.sinks = declare((L, N), ("layers", "heads"), dtype)

    @staticmethod
    def cache_layout(cfg: ModelConfig, num_kv_heads: int) -> tuple[tuple[tuple[int, ...], tuple], ...]:
        """The pools' shapes and logical axes after [layers, pages, page_size]: a key pool and a value pool."""
        pool = ((num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"))
        return (pool, pool)

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP, cache_layer=None, windowed=None):
        """Attention of local layer `layer` for new tokens x_BTD at positions pos_BT.

        Args:
          rope: (the `Rope`, its (cos, sin) tables for pos_BT).
          cache: None (attend within x only) or (k_pool, v_pool) of the stage's layers, each
            [L_local, P, page_size, K, H] local; layer `cache_layer`'s pages are written and read in place.
          page_table_BP: [B, pages per sequence] local page ids (ignored without a cache).
          cache_layer: the layer's index in the stage's pools (default `layer`).
          windowed: None (the config's window applies to every layer) or a traced bool: this layer uses the
            sliding window (`ModelConfig.sliding_layers`).

        Returns:
          (y_BTD reduced over the tensor axis, updated cache).
        """
        cfg = self.cfg
        local = lambda p: at_layer(p, layer)  # noqa: E731
        rope_, tables = rope
        with jax.named_scope("attn/qkv"):
            q_BTNH, k_BTKH, v_BTKH = (project(x_BTD, w, layer) for w in (self.wq, self.wk, self.wv))
            if cfg.qkv_bias:
                q_BTNH, k_BTKH, v_BTKH = (q_BTNH + local(self.bq), k_BTKH + local(self.bk),
                                          v_BTKH + local(self.bv))
            if cfg.qk_norm and cfg.qk_norm_scope == "head":
                q_BTNH = rms_norm(q_BTNH, local(self.q_norm), cfg.rms_norm_eps)
                k_BTKH = rms_norm(k_BTKH, local(self.k_norm), cfg.rms_norm_eps)
            elif cfg.qk_norm:
                q_BTNH = self._norm_all(q_BTNH, local(self.q_norm), "heads")
                k_BTKH = self._norm_all(k_BTKH, local(self.k_norm), "kv_heads")
            if cfg.clip_qkv is not None:  # after the q/k norms, as transformers' OLMoE does (elementwise: any split)
                q_BTNH, k_BTKH, v_BTKH = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q_BTNH, k_BTKH, v_BTKH))
            q_BTNH, k_BTKH = rope_.apply(q_BTNH, *tables), rope_.apply(k_BTKH, *tables)
        scale = cfg.head_dim ** -0.5
        sinks_N = local(self.sinks) if cfg.attention_sinks else None
        if cache is None:
            with jax.named_scope("attn/core"):
                o_BTNH = with_window(cfg.sliding_window, windowed, lambda w: attend(
                    q_BTNH, k_BTKH, v_BTKH, pos_BT, pos_BT, w, scale, sinks_N))
        else:
            cache_layer = layer if cache_layer is None else cache_layer
            with jax.named_scope("attn/cache"):
                # Write the new tokens into the pools in place, then read the sequence's pages.
                # (Each variant here was checked for whole-pool copies in the compiled HLO: reading
                # the old pool before the write, or reshaping the pool's unit stage axis away
                # before the scatter, made XLA:CPU copy every pool every step.)
                cache = tuple(write_pages(pool, cache_layer, new, pos_BT, page_table_BP) for pool, new in
                              zip(cache, (k_BTKH, v_BTKH), strict=True))
            with jax.named_scope("attn/core"):
                o_BTNH = with_window(cfg.sliding_window, windowed, lambda w: cached_attention(
                    q_BTNH, cache, cache_layer, page_table_BP, pos_BT, w, scale, sinks_N))
        with jax.named_scope("attn/out"):
            # (N, H) contracted as one axis on both sides: as two dims, XLA:CPU transposed the (large)
            # weight instead, a copy of wo per layer per step.
            y_BTD = self.par.psum(project(o_BTNH, self.wo, layer, contract=2), "heads")
            if cfg.o_bias:
                y_BTD = y_BTD + local(self.bo)
        return y_BTD, cache

    def _norm_all(self, x_BTNH, weight_NH, axis: str):
        """RMSNorm over the whole projected width (every head), whose heads are split over `tensor`: the sum of
        squares is summed over the shards. Repeated kv heads (fewer kv heads than `tensor`) are repeated equally
        often, so the mean over the stored heads is the mean over the model's."""
        x32 = x_BTNH.astype(jnp.float32)
        local_sq = jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True)
        width = x_BTNH.shape[-2] * x_BTNH.shape[-1] * self.par.size(axis)
        mean = self.par.psum(local_sq, axis) / width
        return weight_NH * (x32 * jax.lax.rsqrt(mean + self.cfg.rms_norm_eps)).astype(x_BTNH.dtype)


def with_window(window: int | None, windowed, fn):
    """fn(window) for a layer whose use of the sliding window is `windowed`: None (static: every layer uses the
    config's window) or a traced bool (per layer, `ModelConfig.sliding_layers`: one `lax.cond`, so each branch
    keeps a static window for the kernels)."""
    if windowed is None or not window:
        return fn(window)
    return jax.lax.cond(windowed, lambda: fn(window), lambda: fn(None))


def cached_attention(q_BTNH, cache, layer, page_table_BP, pos_BT, window, scale: float, sinks_N=None):
    """Attention of the new queries over their rows' cached pages (the new tokens already written).

    Chosen by `choose_paged_attention` from the mesh's platform: on CPU (float32, bfloat16) the native kernel reads each
    query's own keys in place (`moejax.native`); on GPU the Pallas kernel does (`moejax.model.paged_attention`);
    else the row's whole page window is gathered (a quantized pool's dequantized into q's dtype), and the native
    kernel reads it as a pool of the rows' windows ("native-dequantized"), or the slots past the row's last
    position, which are not its own (stale or another's), are zeroed: they must not reach the arithmetic, not
    even as 0 * value (isolation invariant).
    """
    values = tuple(kv_cache.values_of(pool) for pool in cache)
    quantized = kv_cache.format_of(cache[0]) is not None
    kind = choose_paged_attention(native.platform(q_BTNH), native.runs(q_BTNH, *(() if quantized else values)),
                                  values[0].shape, sinks=sinks_N is not None,
                                  same_kv=q_BTNH.shape[-1] == values[1].shape[-1], quantized=quantized)
    q_scaled = q_BTNH * jnp.asarray(scale * q_BTNH.shape[-1] ** 0.5, q_BTNH.dtype)  # the kernels scale by H^-0.5
    if kind == "native":
        return native.paged_attention(q_scaled, *cache, layer, page_table_BP, pos_BT, window)
    if kind == "pallas":
        return paged_attention.paged_attention(q_scaled, cache, layer, page_table_BP, pos_BT, window)
    k_BCKH = _gather_pages(cache[0], layer, page_table_BP, q_BTNH.dtype)
    v_BCKH = k_BCKH if cache[1] is cache[0] else _gather_pages(cache[1], layer, page_table_BP, q_BTNH.dtype)  # MLA
    if kind == "native-dequantized":  # row b's window is pages [b * MP, (b + 1) * MP) of a one-layer pool
        B, MP = page_table_BP.shape
        windows = (a.reshape(1, B * MP, -1, *a.shape[2:]) for a in (k_BCKH, v_BCKH))
        return native.paged_attention(q_scaled, *windows, 0, jnp.arange(B * MP, dtype=jnp.int32).reshape(B, MP),
                                      pos_BT, window)
    kpos_BC = jnp.broadcast_to(jnp.arange(k_BCKH.shape[1], dtype=jnp.int32), k_BCKH.shape[:2])
    owned_BC = kpos_BC <= jnp.max(pos_BT, axis=1, keepdims=True)
    k_BCKH, v_BCKH = (jnp.where(owned_BC[..., None, None], a, 0) for a in (k_BCKH, v_BCKH))
    return attend(q_BTNH, k_BCKH, v_BCKH, pos_BT, kpos_BC, window, scale, sinks_N)


def choose_paged_attention(platform: str, native_ok: bool, pool_shape, sinks: bool = False,
                           same_kv: bool = True, quantized: bool = False) -> str:
    """Which paged attention runs: "native" (CPU kernels, f32 or bf16), "pallas" (GPU, pages and head dim powers of two
    >= 16) or "xla" (gather the page window; everywhere); for a quantized pool, whose pages are dequantized as
    they are gathered (the kernels take float pools), "native-dequantized" (CPU: the native kernel over the
    gathered window) or "xla". The one place this is decided. Attention sinks (gpt-oss) and keys wider than the
    values they read (MLA's latent) run on "xla": the kernels take neither.

    On CPU the native kernel over the dequantized window took 0.6-0.8x the time of "xla" (one layer's attention,
    batch 8 at 1024 tokens, kv heads x head dim 2 x 64 and 8 x 128, int8 and fp8, 2026-12), and 0.9-3.4x that
    of "native" over float pools in place: the window is written in float32 first, so on CPU a quantized cache
    saves memory, not time."""
    _, _, page_size, _, head_dim = pool_shape
    if sinks or not same_kv:
        return "xla"
    if quantized:
        return "native-dequantized" if platform == "cpu" and native_ok else "xla"
    if platform == "cpu" and native_ok:
        return "native"
    if platform == "gpu" and paged_attention.supported(page_size, head_dim):
        return "pallas"
    return "xla"


def attend(q_BTNH, k_BCKH, v_BCKH, qpos_BT, kpos_BC, window: int | None = None, scale: float | None = None,
           sinks_N=None):
    """Causal GQA over keys at positions kpos_BC (< 0: absent); scores and softmax in float32.

    scale: of the scores (default H^-0.5). sinks_N: a learned logit per query head that joins every softmax
    with no value (gpt-oss), or None. Values may be narrower or wider than keys (MLA reads its latent)."""
    B, T, N, H = q_BTNH.shape
    K = k_BCKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTC = jnp.einsum("BTKGH,BCKH->BKGTC", q_BTKGH, k_BCKH, preferred_element_type=jnp.float32)
    s_BKGTC = s_BKGTC * (H**-0.5 if scale is None else scale)
    qpos, kpos = qpos_BT[:, :, None], kpos_BC[:, None, :]
    mask_BTC = (kpos <= qpos) & (kpos >= 0)
    if window:
        mask_BTC &= qpos - kpos < window
    s_BKGTC = jnp.where(mask_BTC[:, None, None], s_BKGTC, _MASKED)
    if sinks_N is None:
        p_BKGTC = jax.nn.softmax(s_BKGTC, axis=-1)
    else:  # the sink's logit joins the normaliser only
        sink_KG = sinks_N.astype(jnp.float32).reshape(K, N // K)[None, :, :, None, None]
        m = jnp.maximum(jnp.max(s_BKGTC, axis=-1, keepdims=True), sink_KG)
        e_BKGTC = jnp.exp(s_BKGTC - m)
        p_BKGTC = e_BKGTC / (jnp.sum(e_BKGTC, axis=-1, keepdims=True) + jnp.exp(sink_KG - m))
    o_BTKGV = jnp.einsum("BKGTC,BCKV->BTKGV", p_BKGTC.astype(v_BCKH.dtype), v_BCKH)
    return o_BTKGV.reshape(B, T, N, v_BCKH.shape[-1])


def write_pages(pool_LPsKH, layer, new_BTKH, pos_BT, page_table_BP):
    """`pool_LPsKH` with the new tokens written at layer `layer`, in place (a `QuantizedPool`: quantized first)."""
    values = kv_cache.values_of(pool_LPsKH)
    _, num_pages, page_size = values.shape[:3]
    block = jnp.clip(pos_BT // page_size, 0, page_table_BP.shape[1] - 1)
    page_BT = jnp.take_along_axis(page_table_BP, block, axis=1)
    # Padding, and a page id outside [0, num_pages) (never wrapped onto another row's page): dropped.
    page_BT = jnp.where((pos_BT >= 0) & (page_BT >= 0) & (page_BT < num_pages), page_BT, num_pages)
    at = (layer, page_BT, pos_BT % page_size)
    if kv_cache.format_of(pool_LPsKH) is not None:
        return kv_cache.write(pool_LPsKH, at, new_BTKH)
    if values.dtype != jnp.bfloat16:
        return values.at[at].set(new_BTKH.astype(values.dtype), mode="drop")
    # XLA:CPU scatters into a bfloat16 array by converting all of it to float32 and back: two copies of the whole
    # pool per pool, layer and step (bench-moe-100m, batch 32 decode: 29 of 68 ms a step, 2026-12). On CPU the
    # native kernel writes the rows in place; else the scatter runs on the pool's uint16 bits (XLA:CPU still
    # copies the pool for each bitcast: 12 ms of that step).
    rows_MR = new_BTKH.reshape(-1, *values.shape[3:])
    if native.platform(values) == "cpu" and native.available() and native.has("moejax_write_rows"):
        return native.write_rows(values, rows_MR, layer, page_BT.reshape(-1), (pos_BT % page_size).reshape(-1))
    bits = jax.lax.bitcast_convert_type(values, jnp.uint16)
    new_bits = jax.lax.bitcast_convert_type(new_BTKH.astype(values.dtype), jnp.uint16)
    return jax.lax.bitcast_convert_type(bits.at[at].set(new_bits, mode="drop"), values.dtype)


def _gather_pages(pool_LPsKH, layer, page_table_BP, dtype=jnp.float32):
    """The row's pages of one layer, [B, pages * page_size, K, H] (a quantized pool's dequantized into `dtype`): one
    gather (never a copy of the pool). A page id outside [0, pages) reads NaN (never another page; a quantized
    pool's scale is NaN there): attended, it makes the row's logits non-finite, which the engine reports as that
    request's error."""
    B, MP = page_table_BP.shape
    if kv_cache.format_of(pool_LPsKH) is None:
        pages = jnp.asarray(pool_LPsKH).at[layer, page_table_BP].get(mode="fill", fill_value=jnp.nan,
                                                                      wrap_negative_indices=False)
    else:
        pages = kv_cache.read(pool_LPsKH, (layer, page_table_BP), dtype)
    return pages.reshape(B, MP * pages.shape[2], *pages.shape[3:])
