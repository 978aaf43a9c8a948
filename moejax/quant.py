"""Quantized weights: one type (`Quantized`: values in their storage dtype + scales with their own logical axes),
quantized and dequantized with qwix's arrays (`qwix.quantize`, `qwix.dequantize`), declared by
`moejax.model.layers.declare_weight` and consumed in one place per kind of matmul (`moejax.model.layers.project`
and `at_layer`, the MoE dispatch).

Post-training, weight-only (`moejax.load(..., quantization=...)`, `--quantization`, vLLM's name):

- "int8": symmetric int8, one scale per output channel (per layer and expert).
- "fp8": float8 e4m3 (max 448), one scale per output channel.
- "int4": symmetric int4 in blocks of `INT4_BLOCK` (128) along the contracted dim, one scale per block and output
  channel (per-channel int4 loses too much; 128 is the group size GPTQ/AWQ checkpoints use); a contracted dim not
  a multiple of the block (or whose shards are not) falls back to one block.

What is quantized: every matmul weight of the layers (attention projections, MLA's down- and output projections,
routed / shared experts, dense FFNs). Kept in the serving dtype: the embedding (a gather), the unembedding, norms,
biases, the router (numerics policy: expert choice), MLA's kv up-projection (absorbed into the query).

A quantized checkpoint's own scheme (`Scheme(stored=True)`, `moejax.checkpoint.quantized`: FP8 block-scaled,
MXFP4, compressed-tensors) covers the tensors it stores quantized, values and scales loaded as stored.

Scales are computed from the whole contracted extent of each output channel (`weights.place` reads it), never
from one device's shard, so a quantized model is the same on every layout. Values are dequantized into the
compute dtype inside the step, one layer's (or one routed expert's) slice at a time: never a full-size float
copy of the weights in device memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from moejax import native
from moejax.config import QUANTIZATIONS

INT4_BLOCK = 128


@dataclass(frozen=True)
class Scheme:
    """How one quantization stores a weight: its qwix qtype, storage dtype and block along the contracted dims.

    Post-training schemes (`SCHEMES`) quantize every matmul weight; a checkpoint's own (`stored=True`, from
    `moejax.checkpoint.quantized`) covers the canonical tensors it stores quantized (`names`), with the
    checkpoint's block along the contracted dim (None: one scale per output channel, or per tensor)."""

    name: str
    qtype: object
    block: int | None  # along the (last) contracted dim; None: one scale per output channel
    stored: bool = False  # the checkpoint's values and scales, loaded as stored (not quantized here)
    names: frozenset[str] | None = None  # canonical tensors it covers; None: every quantizable weight
    fmt: str = ""  # a stored scheme's checkpoint format, for messages ("fp8 blocks of 128x128", "mxfp4")

    @property
    def bytes_per_value(self) -> float:
        return 0.5 if self.qtype in (jnp.int4, jnp.float4_e2m1fn) else 1.0

    def quantizes(self, name: str) -> bool:
        """Whether canonical tensor `name` (declared as a matmul weight) is quantized under this scheme."""
        return self.names is None or name in self.names

    def describe(self) -> str:
        return self.fmt or self.name


SCHEMES = {"int8": Scheme("int8", jnp.int8, None), "fp8": Scheme("fp8", jnp.float8_e4m3fn, None),
           "int4": Scheme("int4", jnp.int4, INT4_BLOCK)}


def scheme(name: str | Scheme | None) -> Scheme | None:
    if name is None or isinstance(name, Scheme):
        return name
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose from {QUANTIZATIONS} (or None for the checkpoint's "
                         f"float weights)")
    return SCHEMES[name]


class Quantized(nnx.Module):
    """A quantized weight: `values` [*shape] in the storage dtype and `scale` [*shape with each contracted dim
    replaced by its number of blocks (1: per output channel)] in the compute dtype, each with its logical axes
    (a blocked contracted dim's scale splits like the dim; a per-channel one is replicated)."""

    def __init__(self, shape, axes, dtype, contracted: tuple[int, ...], sch: Scheme, blocks: tuple[int, ...]):
        self.contracted, self.qtype, self.scheme, self.axes = contracted, sch.qtype, sch, tuple(axes)
        scale_shape = tuple(blocks[contracted.index(d)] if d in contracted else n for d, n in enumerate(shape))
        scale_axes = tuple((a if blocks[contracted.index(d)] > 1 else None) if d in contracted else a
                           for d, a in enumerate(axes))
        self.values = nnx.Param(jnp.zeros(shape, sch.qtype), out_sharding=tuple(axes), eager_sharding=False)
        self.scale = nnx.Param(jnp.zeros(scale_shape, dtype), out_sharding=scale_axes, eager_sharding=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        return self.scale.dtype

    def qarray(self) -> qwix.QArray:
        return qwix.QArray(self.values[...], self.scale[...], qtype=self.qtype)


def dense(w, dtype=None):
    """A float array from a weight (array, `nnx.Param`, `qwix.QArray` or `Quantized`): dequantized when quantized.

    float8 e4m3 values in a CPU program are decoded from their bits (`e4m3_to_float32`), faster than XLA:CPU's own
    convert from float8 (one expert's [1024, 1024] slice dequantized and multiplied by one row: 0.32 against
    0.46 ms, by 8 rows 0.45 against 0.56 ms, 2026-12-06)."""
    if isinstance(w, Quantized):
        w = w.qarray()
    if isinstance(w, qwix.QArray):
        if w.qvalue.dtype == jnp.float8_e4m3fn and native.platform(w.qvalue) == "cpu":
            out = _times_scale(e4m3_to_float32(as_bits(w.qvalue)).astype(w.scale.dtype), w.scale)
        else:
            out = qwix.dequantize(w)
        return out if dtype is None else out.astype(dtype)
    return w[...] if isinstance(w, nnx.Variable) else w


def _times_scale(values, scale):
    """values * scale with qwix's generic broadcast: a scale dim of 1 or the values' size, or a block count
    (each scale covering values.shape[d] / scale.shape[d] consecutive values)."""
    v_shape, s_shape = [], []
    for n, m in zip(values.shape, scale.shape, strict=True):
        if m in (1, n):
            v_shape.append(n)
            s_shape.append(m)
        else:
            v_shape += [m, n // m]
            s_shape += [m, 1]
    return (values.reshape(v_shape) * scale.reshape(s_shape)).reshape(values.shape)


def as_bits(values):
    """float8 values as their uint8 bits (a free bitcast); other arrays as they are."""
    return jax.lax.bitcast_convert_type(values, jnp.uint8) if values.dtype == jnp.float8_e4m3fn else values


def e4m3_to_float32(bits):
    """float8_e4m3fn codes (uint8 bits, `as_bits`) as float32, by arithmetic on the bits (sign, 4 exponent bits
    biased by 7, 3 mantissa bits), so XLA:CPU never converts from float8 (a scalar loop there; scattering into a
    float8 array converts all of it through float16). Exact for every code but NaN (0x7f / 0xff read as +-480:
    no quantizer here writes them)."""
    bits = bits.astype(jnp.uint32)
    # The 7 low bits moved into a float32's exponent and mantissa, the exponent rebiased by 127 - 7: exact for
    # normal codes; a subnormal code m (exponent 0; value m * 2^-9) reads 2^-7 + m * 2^-10 this way, fixed below.
    x = jax.lax.bitcast_convert_type(((bits & 0x7F) << 20) + (120 << 23), jnp.float32)
    x = jnp.where((bits & 0x78) == 0, 2 * x - 2.0**-6, x)
    return jnp.where(bits >= 0x80, -x, x)


def quantize_block(block: np.ndarray, contracted: tuple[int, ...], sch: Scheme, blocks: tuple[int, ...],
                   scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, scale) of a float block holding whole contracted dims (qwix's absmax calibration and rounding)."""
    tiled = {d: block.shape[d] // n for d, n in zip(contracted, blocks, strict=True) if n > 1}
    channelwise = tuple(d for d in range(block.ndim) if d not in contracted)
    q = qwix.quantize(jnp.asarray(block, jnp.float32), sch.qtype, channelwise_axes=channelwise, tiled_axes=tiled)
    return np.asarray(q.qvalue), np.asarray(q.scale.astype(scale_dtype))


def bytes_of(tree) -> int:
    """Bytes of the arrays in a pytree (quantized values count their storage: int4 and fp4 half a byte)."""
    total = 0
    for a in jax.tree.leaves(tree):
        n = int(np.prod(a.shape))
        total += n // 2 if a.dtype in (jnp.int4, jnp.float4_e2m1fn) else n * a.dtype.itemsize
    return total
