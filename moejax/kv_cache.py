"""Paged KV cache: the pools' quantized format, and the host-side page allocator (page-table rows live on each
request, kept by `moejax.engine.scheduler`).

The device pools are the attention kind's (`cache_layout`; GQA a (k, v) pair, each [L_pad, P_total, page_size, K,
H]; see `moejax.steps`): layers split over `stage`, kv heads over `tensor`, pages over the data groups (`data`,
times `expert` in the "dp_attention" expert mode). Data group g owns the global pages
[g * P_group, (g + 1) * P_group) and addresses them by LOCAL ids 0..P_group-1; a request lives in one
data group and only ever holds that group's pages.

Quantized KV cache (`KV_CACHE_DTYPES`: "fp8" = float8_e4m3fn, "int8"): each pool is a `QuantizedPool` of 1-byte
values (the float pool's shape and axes) and a float32 scale per vector along the last axis (GQA: per (token, kv
head); MLA: per token of its latent pool), [L_pad, P_total, page_size, K], split like the values. The scale is
dynamic: absmax / 448 (fp8) or absmax / 127 (int8, rounded to nearest), at least the smallest normal float32, so
a zero vector stores zeros with a finite scale. Tokens are quantized when their page slot is written and
dequantized into the compute dtype when pages are read; a token's stored bytes depend on that token alone, so
batching, chunking and preemption give the same bytes (busy == alone holds as for float pools).

Invariant (from `moejax.model.attention`): token at position p of a sequence lives in page
`table[p // page_size]` at slot `p % page_size`. Pages beyond a sequence's length may hold stale
data from earlier owners, NaN included; attention zeroes every slot past a row's last position before
any arithmetic, so reuse needs no zeroing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.config import KV_CACHE_DTYPES, ceil_div
from moejax.quant import as_bits, e4m3_to_float32

STORAGE = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}  # a quantized KV cache's value dtype
_LARGEST = {"fp8": 448.0, "int8": 127.0}  # the value an absmax maps to
_NAME_OF_STORAGE = {jnp.dtype(dtype): name for name, dtype in STORAGE.items()}


class QuantizedPool(NamedTuple):
    """A quantized KV pool (a pytree): `values` [L, P, page_size, ..., W] in 1 byte, `scale` [L, P, page_size, ...]
    float32 (one per vector of W values)."""

    values: jax.Array
    scale: jax.Array


def check_kv_cache_dtype(value, where: str = "kv_cache_dtype") -> str | None:
    """`value` when it is None or a name of `KV_CACHE_DTYPES`; else ValueError naming `where`, the value and the
    choices."""
    if value is None or (isinstance(value, str) and value in KV_CACHE_DTYPES):
        return value
    raise ValueError(f"{where} must be one of {list(KV_CACHE_DTYPES)} or None (the serving dtype), got {value!r}")


def quantize(x_W, kv_cache_dtype: str):
    """(values in `STORAGE[kv_cache_dtype]`, float32 scales over x_W.shape[:-1]): x_W ~= values * scale[..., None].

    The scale is absmax / the format's largest value (448 fp8 e4m3, 127 int8) per vector along the last axis, at
    least the smallest normal float32 (a zero vector: zero values, finite scale); NaN/inf in a vector make its
    scale non-finite, so it reads back non-finite (the request's error, as with a float pool)."""
    x32 = x_W.astype(jnp.float32)
    largest = _LARGEST[kv_cache_dtype]
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1) / largest, jnp.finfo(jnp.float32).tiny)
    q = jnp.clip(x32 / scale[..., None], -largest, largest)
    if kv_cache_dtype == "int8":
        q = jnp.round(q)
    return q.astype(STORAGE[kv_cache_dtype]), scale


def dequantize(values_W, scale, dtype):
    """values * scale in `dtype` (float32 arithmetic)."""
    return (_to_float32(_bits(values_W), values_W.dtype) * scale[..., None]).astype(dtype)


def write(pool: QuantizedPool, at: tuple, new_W) -> QuantizedPool:
    """`pool` with `new_W` quantized and written at index `at` of its values (the scale at `at` too); out-of-range
    indices are dropped. In place when the pool is donated."""
    values, scale = quantize(new_W, format_of(pool))
    bits = _bits(pool.values).at[at].set(_bits(values), mode="drop")
    return QuantizedPool(jax.lax.bitcast_convert_type(bits, pool.values.dtype),
                         pool.scale.at[at].set(scale, mode="drop"))


def read(pool: QuantizedPool, at: tuple, dtype):
    """The values at index `at` (a gather), dequantized into `dtype`. An index out of range reads NaN (its scale
    is NaN), never another entry."""
    def get(array, fill):
        return array.at[at].get(mode="fill", fill_value=fill, wrap_negative_indices=False)

    return (_to_float32(get(_bits(pool.values), 0), pool.values.dtype) * get(pool.scale, jnp.nan)[..., None]
            ).astype(dtype)


def _bits(values):
    """float8 values as their uint8 bits (`quant.as_bits`, a free bitcast): XLA:CPU scatters into and gathers from a
    float8 array by converting all of it to float16 and back, a copy of the whole pool per layer per step (a decode
    step took 2.5x int8's, 2026-12, bench-moe-100m, batch 8 at 1024 tokens); int8 as it is."""
    return as_bits(values)


def _to_float32(bits, dtype):
    """1-byte values (`_bits` of `dtype`) as float32: float8_e4m3fn by its bits (`quant.e4m3_to_float32`, so XLA
    never converts from float8; a NaN token's scale is NaN)."""
    return e4m3_to_float32(bits) if dtype == jnp.float8_e4m3fn else bits.astype(jnp.float32)


def format_of(pool) -> str | None:
    """The KV cache dtype name of a pool (a `QuantizedPool`), None for a float pool."""
    return _NAME_OF_STORAGE[jnp.dtype(pool.values.dtype)] if isinstance(pool, QuantizedPool) else None


def values_of(pool) -> jax.Array:
    """A pool's values buffer (a float pool is its own)."""
    return pool.values if isinstance(pool, QuantizedPool) else pool


def pool_parts(pool, axes: tuple) -> list[tuple[jax.Array, tuple]]:
    """(array, logical axes) of each buffer of a pool: a float pool is one, a `QuantizedPool` two (its scale has the
    values' axes but the last)."""
    if isinstance(pool, QuantizedPool):
        return [(pool.values, axes), (pool.scale, axes[:-1])]
    return [(pool, axes)]


def pool_specs(pool, axes: tuple, spec):
    """The partition specs of a pool's buffers in the pool's own structure (`spec`: logical axes -> spec)."""
    if isinstance(pool, QuantizedPool):
        return QuantizedPool(spec(axes), spec(axes[:-1]))
    return spec(axes)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` positions."""
    return ceil_div(num_tokens, page_size)


class PageAllocator:
    """Free lists of local page ids, one per data group. Pure host state, O(pages) per call.

    Args:
      num_groups: data groups, the model's batch shards (`data`, times `expert` in the dp_attention expert mode).
      pages_per_group: pages in each group's pool.
    """

    def __init__(self, num_groups: int, pages_per_group: int):
        if num_groups < 1 or pages_per_group < 1:
            raise ValueError(f"need at least one group and one page, got {num_groups} groups x {pages_per_group} pages")
        self.num_groups = num_groups
        self.pages_per_group = pages_per_group
        # Stack of free ids; popping from the end hands out low ids first.
        self._free = [list(range(pages_per_group - 1, -1, -1)) for _ in range(num_groups)]

    def num_free(self, group: int) -> int:
        return len(self._free[group])

    @property
    def total_free(self) -> int:
        return sum(len(f) for f in self._free)

    def allocate(self, group: int, n: int) -> list[int] | None:
        """n local page ids of `group`, or None (nothing taken) when fewer are free."""
        free = self._free[group]
        if n > len(free):
            return None
        if n == 0:
            return []
        taken = free[-n:]
        del free[-n:]
        return taken[::-1]

    def free(self, group: int, pages: list[int]) -> None:
        """Return pages to `group`'s pool (most recently freed are reused first)."""
        free = self._free[group]
        if len(free) + len(pages) > self.pages_per_group:
            raise RuntimeError(f"double free in data group {group}: {len(pages)} pages back, {len(free)} already free")
        free.extend(reversed(pages))

