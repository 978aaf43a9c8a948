"""Types inside `jax.shard_map` bodies (`check_vma=True`): which mesh axes a value varies over.

A value computed from operands that differ per shard differs per shard too. JAX tracks this for its own
primitives; a loop carry started from zeros, and the result of a custom kernel (Pallas, XLA FFI), must be told.
Outside a shard_map body every value varies over nothing and these are no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(*operands) -> frozenset:
    """The mesh axes any of `operands` varies over."""
    return frozenset().union(*(jax.typeof(a).mat.varying for a in operands))


def varying_like(x, *like):
    """x typed as varying over every mesh axis one of `like` varies over (no data moves): a loop carry's start
    when the loop body mixes it with `like`."""
    axes = varying_axes(*like) - jax.typeof(x).mat.varying
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def result(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """The type of a custom kernel's result made from `operands`: varying over every axis they vary over."""
    mat = jax.typeof(operands[0]).mat.update(varying=varying_axes(*operands)) if operands else None
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def aligned(*operands):
    """`operands`, each typed as varying over the union of what they vary over (a custom kernel takes operands of
    one type)."""
    axes = varying_axes(*operands)
    return tuple(varying_like(a, *operands) if jax.typeof(a).mat.varying != axes else a for a in operands)


def call_kernel(call, *operands):
    """`call(*operands)` for a Pallas kernel whose `out_shape` comes from `result`: the operands typed alike."""
    return call(*aligned(*operands))


def checks_replication(platform: str, moe_strategy: str) -> bool:
    """Whether a step's `shard_map` runs with `check_vma=True`: everywhere but a program that runs the Pallas
    grouped GEMM in interpret mode (MoE strategy "pallas" off GPU: tests only). JAX's Pallas interpreter
    (jaxlib 0.10.2) slices the blocks, which vary per shard, with the grid's program ids, which vary over
    nothing, and the check refuses its own interpreter ("dynamic_slice requires varying manual axes to match").
    The compiled GPU kernel is checked."""
    return not (moe_strategy == "pallas" and platform != "gpu")
