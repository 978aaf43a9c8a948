"""Small building blocks shared by attention and MoE: weight declaration, projections, RMSNorm, argmax (RoPE:
`moejax.model.rope`).

Numerics policy (one place): norms, RoPE, router logits and softmax run in float32 whatever the
serving dtype, because bf16 rounding there flips expert choices and shifts positions; weights
are stored, and matmuls run, in the serving dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import native, quant
from moejax.model import fp8_matmul


def declare(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    """Declare one weight: shape, dtype and logical axes, the single source for shardings and loading.

    Modules are built under `nnx.eval_shape`, so no memory is allocated here; values are placed
    shard by shard by `moejax.weights`.
    """
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


def declare_weight(shape, axes, dtype, contracted: tuple[int, ...], sch: quant.Scheme | None, shards=None):
    """A matmul weight: an `nnx.Param` in `dtype`, or `Quantized` under a quantization scheme.

    contracted: the dims the matmul contracts (indices into `shape`). shards: dim -> shards that split it (to
    keep a blocked dim's blocks inside one shard); None: unsplit. Blocks run along the last contracted dim:
    post-training int4 takes blocks of `sch.block` where every shard holds whole ones (else one block);
    a checkpoint's blocks (`sch.stored`) are tiled by gcd(block, the dim's shard), so every tile lies inside
    one stored block and one shard, and its scale is that block's (exact, whatever the layout)."""
    if sch is None:
        return declare(shape, axes, dtype)
    blocks = []
    for d in contracted:
        local = shape[d] // (shards or {}).get(d, 1)
        if sch.stored:
            tiled = sch.block is not None and d == contracted[-1]
            blocks.append(shape[d] // math.gcd(sch.block, local) if tiled else
                          (shape[d] if sch.block is not None else 1))
            continue
        blocked = sch.block and local % sch.block == 0 and d == contracted[-1]
        blocks.append(shape[d] // sch.block if blocked else 1)
    return quant.Quantized(shape, axes, dtype, tuple(contracted), sch, tuple(blocks))


def at_layer(param, layer):
    """Layer `layer` of a weight stacked over the local layers of a stage ([L_local, ...] -> [...]).

    Inside the decoder's `lax.scan` the index is traced, so this is a dynamic slice. XLA:CPU
    materialises it before a matmul reads it (one copy of the layer's weight per step); routed
    experts are therefore never sliced here as a whole layer, but one expert at a time inside
    the MoE dispatch (`moejax.model.moe`). A quantized weight (`moejax.quant.Quantized`) is dequantized here, one
    layer's slice into its scale's dtype.
    """
    if isinstance(param, quant.Quantized):
        return quant.dense(param.qarray()[layer])
    return param[...][layer]


def project(x, w, layer=None, contract: int = 1):
    """x @ w[layer]: x's last `contract` axes against the first `contract` axes of the layer's weight.

    w: a stacked weight [L, *contracted, *out] (an nnx.Param or array), or [*contracted, *out] when
    `layer` is None. On CPU in float32 or bfloat16 the native kernel reads the layer's weight in place, where
    XLA:CPU would copy the dynamic slice first (`at_layer`) and run a slower dot: few rows (decode)
    stream the weight, many rows (prefill) run packed panels (at 256 rows x 512 x 512: 426 against
    285 GFLOP/s on two AVX-512 cores, docs/benchmarks.md); else XLA's dot on `at_layer`. A quantized weight's
    layer slice is dequantized into x's dtype, or, FP8 in a GPU program, multiplied in FP8 with x quantized on
    the fly (W8A8: `moejax.model.fp8_matmul`), or, int8 with one scale per output channel in a CPU program, read in
    place by the native kernel (`native.matmul` with `scale`: int8 values widened in registers, the float32 sums
    times the scale). int4 and fp8 on CPU: dequantized by XLA.
    """
    if isinstance(w, quant.Quantized) and native.runs_int8(x, w):
        values = w.values[...] if layer is not None else w.values[...][None]
        I = math.prod(values.shape[1:1 + contract])
        assert x.shape[x.ndim - contract:] == values.shape[1:1 + contract], (x.shape, values.shape, contract)
        y_MO = native.matmul(x.reshape(-1, I), values.reshape(values.shape[0], I, -1), 0 if layer is None else layer,
                             scale=w.scale[...].reshape(values.shape[0], -1))
        return y_MO.reshape(*x.shape[:x.ndim - contract], *values.shape[1 + contract:])
    if isinstance(w, quant.Quantized):  # dequantize the layer's slice (native kernels: float or int8 weights)
        w = w.qarray()[layer] if layer is not None else w.qarray()
        if fp8_matmul.applies(x, w):  # FP8 weights in a GPU program: W8A8 on FP8 GEMMs
            return fp8_matmul.matmul(x, w, contract)
        w, layer = quant.dense(w, x.dtype), None
    w = w[...] if isinstance(w, nnx.Param) else w
    if layer is None:
        w, layer = w[None], 0
    k_in, k_w = x.shape[x.ndim - contract:], w.shape[1:1 + contract]
    assert k_in == k_w, (x.shape, w.shape, contract)
    I, out = math.prod(k_in), w.shape[1 + contract:]
    x_MI = x.reshape(-1, I)  # contracted axes flattened on the (small) activation, never transposing w
    if native.runs(x, w):
        y_MO = native.matmul(x_MI, w.reshape(w.shape[0], I, -1), layer)
    else:
        y_MO = x_MI @ w[layer].reshape(I, -1)
    return y_MO.reshape(*x.shape[:x.ndim - contract], *out)


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim, computed in float32 (as Hugging Face does), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def argmax(x_BV):
    """jnp.argmax over the last axis of [B, V] (first maximum; first NaN if any; int32)."""
    return argmax_and_finite(x_BV)[0]


def argmax_and_finite(x_BV):
    """(argmax [B] int32, all finite [B] bool) of each row of x_BV [B, V], both from one pass.

    On CPU in float32 one native call (`moejax.native.argmax`); else a max, then the min index of
    its hits: XLA:CPU runs jnp.argmax as a variadic (value, index) reduction that does not
    vectorize (2.1 ms for [32, 32000] float32 against 0.44 ms for the two reductions; the native
    pass with the finiteness check 0.07 ms, 2026-12-01).
    """
    if native.runs(x_BV) and x_BV.ndim == 2:
        return native.argmax(x_BV)
    V = x_BV.shape[-1]
    hit_BV = (x_BV == jnp.max(x_BV, axis=-1, keepdims=True)) | jnp.isnan(x_BV)  # a NaN row: max is NaN
    iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
    return jnp.min(jnp.where(hit_BV, iota_BV, V), axis=-1), jnp.all(jnp.isfinite(x_BV), axis=-1)
