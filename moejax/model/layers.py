"""Small building blocks shared by attention and MoE: weight declaration, RMSNorm, RoPE.

Numerics policy (one place): norms, RoPE, router logits and softmax run in float32 whatever the
serving dtype, because bf16 rounding there flips expert choices and shifts positions; weights
are stored, and matmuls run, in the serving dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def declare(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    """Declare one weight: shape, dtype and logical axes, the single source for shardings and loading.

    Modules are built under `nnx.eval_shape`, so no memory is allocated here; values are placed
    shard by shard by `moejax.weights`.
    """
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


def at_layer(param: nnx.Param, layer):
    """Layer `layer` of a weight stacked over the local layers of a stage ([L_local, ...] -> [...]).

    Inside the decoder's `lax.scan` the index is traced, so this is a dynamic slice. XLA:CPU
    materialises it before a matmul reads it (one copy of the layer's weight per step); routed
    experts are therefore never sliced here as a whole layer, but one expert at a time inside
    the MoE dispatch (`moejax.model.moe`).
    """
    return param[...][layer]


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim, computed in float32 (as Hugging Face does), cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_tables(positions_BT, head_dim: int, theta: float):
    """cos/sin tables [B, T, H/2] in float32 for the default (non-interleaved) RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
    """Rotate halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in float32."""
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
