"""FP8 compute (W8A8) for FP8-quantized weights: activations quantized on the fly, the dot on FP8 operands.

A weight-only FP8 model (`moejax.quant`, values float8 e4m3 + float scales) dequantizes each layer's slice into
the compute dtype before a bf16/f32 dot; XLA's GPU compiler makes an FP8 GEMM only of a dot whose two operands
are FP8, so that never runs on the FP8 tensor cores. Here (as vLLM and TensorRT-LLM run fp8 on Hopper) the
activation is quantized too and the dot runs on FP8 operands with float32 accumulation:

    y[m, o] = sum over blocks c of  sx[m, c] * sw[c, o] * sum_{k in c} f8(x[m, k] / sx[m, c]) * w8[k, o]

- activations: one dynamic scale per token row and weight block, sx = max|x| / 448 (e4m3's largest finite value;
  a row of zeros takes 1), values x / sx rounded to e4m3 (round to nearest even; clipped to +-448);
- weights: the stored e4m3 values and scales as they are (`qwix.QArray`: one scale per output channel, or per
  block of the contracted dims: the scale's contracted extents are the block counts);
- the dot: `lax.dot_general` of the two FP8 arrays, `preferred_element_type=float32`, batched over the blocks of
  the contracted dims (per-channel weights: one plain dot); the scales multiply its float32 output, then the
  blocks are summed and the result cast to the activation's dtype.

What XLA makes of it (jaxlib 0.10.2 compiling for H100, `moejax.gpu_target.fp8_gemms`): the FP8 dot with the
per-row and per-channel scales applied to its output becomes an FP8 GEMM of unit scales: a Triton GEMM fusion
whose `dot` reads two f8e4m3fn operands (the form a deviceless compile picks; it cannot autotune), or with
Triton GEMMs off (`xla_gpu_enable_triton_gemm=false`) the cuBLASLt custom call `__cublas$lt$matmul$f8` (rows
padded to 16). Per-tensor activation scales compile to the same ops, so nothing is gained by coarser scales;
per-row ones are kept. A single row (decode at one token per device) is no GEMM at all: XLA turns the
matrix-vector product into a reduction over the converted operands, FP8 or not (it reads half the bytes of bf16).

Known cost (not fixed here): FP8 GEMMs read both operands contracted-dim-minor, and the weights are stored
contracted-dim-major ([L, ..., K, O]), so XLA transposes every fp8 weight stack before the layer loop: a temporary
the size of the fp8 weights, rewritten every step (qwen3-30b-a3b DP1 decode for H100: 27.9 GiB of temporaries
against 0.01 GiB weight-only). Storing fp8 values contracted-dim-last removes it (a scan of 8 layers: 1.6 MB of
temporaries instead of 10 MB); tests/test_gpu_compile.py holds this as an expected failure.

Opt-in until the storage is fixed: with that copy, an FP8 model's GPU program needs about twice its weights in
memory, so the path is off unless asked for (`MOEJAX_FP8_GEMM=1`, or `moejax bench compile --fp8-gemm`, which set
`PLATFORMS`); GPU programs otherwise dequantize fp8 weights per layer like every other platform.

When: `applies` holds for an e4m3 weight in a program traced for a GPU mesh (`moejax.native.platform`: the
platform of the mesh, so a CPU process compiling for an H100 target (`moejax.gpu_target`) takes it too), the same
place moejax picks every kernel from. It is off on CPU (`PLATFORMS`), where the weight-only path is kept: there it
equals the float model on the dequantized weights exactly, and XLA:CPU has no FP8 dot (it converts both operands to
float32, so W8A8 would only add the activation's rounding). GPUs without FP8 tensor cores (before Hopper / Ada)
are not told apart: XLA runs the FP8 dot in a wider type there (not checked on such a GPU).

Numerics: W8A8 is not bit-equal to the weight-only model. Each activation is rounded to e4m3 (3 mantissa bits:
a relative error of at most 2^-4 per element, about 2^-5.6 RMS for uniformly spread mantissas) before the dot;
the dot itself is exact up to float32 accumulation against the dequantized operands (tests/test_fp8_matmul.py
checks both: the function against a float reference on the same quantized operands, and a whole model against the
weight-only one).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import qwix

from moejax import native, quant

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# The platforms whose programs run FP8 weights as W8A8 (the mesh's, `native.platform`): opt-in (module doc).
PLATFORMS = ("gpu",) if os.environ.get("MOEJAX_FP8_GEMM", "0") == "1" else ()


def applies(x, w) -> bool:
    """Whether x @ w runs as W8A8 FP8: w a `qwix.QArray` of float8 e4m3 values, in a program for a platform of
    `PLATFORMS` (that of the mesh it is traced for)."""
    return (isinstance(w, qwix.QArray) and w.qvalue.dtype == FP8 and w.zero_point is None
            and native.platform(x) in PLATFORMS)


def quantize_activation(x, axes: tuple[int, ...]):
    """(e4m3 values, float32 scales) of x with one scale per slice over `axes` (kept as size-1 dims):
    scale = max|x| / 448 (1 where the slice is all zeros), values = x / scale rounded to e4m3."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(x32 / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def matmul(x, w: qwix.QArray, contract: int = 1):
    """x @ w in FP8 (W8A8): x's last `contract` axes against the first `contract` axes of w.

    Args:
      x: [..., *K] activations (any float dtype). w: a `qwix.QArray` [*K, *O] of float8 e4m3 values whose scale is
        [*C, *O'] with C the blocks of each contracted dim (1: the whole dim) and O' the output dims or 1 (or
        a divisor: qwix's generic broadcast).
    Returns:
      [..., *O] in x's dtype.
    """
    K, O = w.shape[:contract], w.shape[contract:]
    assert tuple(x.shape[x.ndim - contract:]) == tuple(K), (x.shape, w.shape, contract)
    C = w.scale.shape[:contract]
    lead = x.shape[:x.ndim - contract]
    # Split each blocked contracted dim k into (blocks, k / blocks); unblocked ones stay whole.
    split, blocks_at, inner_at = [], [], []
    for k, c in zip(K, C, strict=True):
        if c > 1:
            blocks_at.append(len(split))
            split.append(c)
        inner_at.append(len(split))
        split.append(k // c)
    x_MK = x.reshape(math.prod(lead), *split)
    w_KO = w.qvalue.reshape(*split, *O)
    xq, sx = quantize_activation(x_MK, tuple(1 + a for a in inner_at))  # per row (and block)
    dims = ((tuple(1 + a for a in inner_at), tuple(inner_at)), (tuple(1 + a for a in blocks_at), tuple(blocks_at)))
    y = jax.lax.dot_general(xq, w_KO, dims, preferred_element_type=jnp.float32)  # [*blocks, M, *O]
    nb = len(blocks_at)
    sx = jnp.moveaxis(sx.reshape(sx.shape[0], *(split[a] for a in blocks_at)), 0, -1)  # [*blocks, M]
    sw = _broadcast_out(w.scale, O).astype(jnp.float32)  # [*C, *O]
    sw = sw.reshape(*(C[i] for i in range(contract) if C[i] > 1), 1, *O)  # [*blocks, 1, *O]
    y = y * sx.reshape(*sx.shape, *(1,) * len(O)) * sw
    y = jnp.sum(y, axis=tuple(range(nb))) if nb else y
    return y.astype(x.dtype).reshape(*lead, *O)


def dot(x, w):
    """x @ w (the last axis of x against the first of w) for a float weight or a `qwix.QArray`: W8A8 FP8 where
    `applies`, else the weight dequantized into x's dtype (weight-only, `quant.dense`)."""
    if isinstance(w, qwix.QArray):
        if applies(x, w):
            return matmul(x, w)
        w = quant.dense(w, x.dtype)
    return x @ w


def at_layer(param, layer):
    """Layer `layer` of a stacked weight, a quantized one kept quantized (a `qwix.QArray` slice, for `dot`)."""
    return param.qarray()[layer] if isinstance(param, quant.Quantized) else param[...][layer]


def _broadcast_out(scale, O):
    """The scale with its output dims repeated up to O where they are blocks (qwix's generic broadcast)."""
    n = scale.ndim - len(O)
    for i, o in enumerate(O):
        if scale.shape[n + i] not in (1, o):
            scale = jnp.repeat(scale, o // scale.shape[n + i], axis=n + i)
    return scale
