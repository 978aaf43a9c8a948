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

import itertools
from collections import OrderedDict
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import native
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
    indices are dropped. In place when the pool is donated.

    `at` = (layer, page, slot) (`moejax.model.attention.write_pages`) in a CPU program: the native kernel writes the
    rows of both buffers in place (`native.write_rows`, bytes copied: the same bits as the scatter). For fp8 pools
    XLA:CPU copies the whole pool around the bitcast to their bits (8 layers' writes of one decode step into
    bench-moe-100m's pools at 1024 pages: 14.7 ms against 0.04 ms native, batch 8 and 32); int8 values and float32
    scales it scatters in place (0.02-0.04 ms either way), 2026-12-06. Else the scatter, on the values' bits
    (`_bits`)."""
    values, scale = quantize(new_W, format_of(pool))
    on_cpu = native.platform(pool.values) == "cpu"
    if len(at) == 3 and on_cpu and native.available() and native.has("moejax_write_rows"):
        layer, page, slot = at
        page, slot = jnp.broadcast_arrays(page, slot)
        rows = values.reshape(-1, *pool.values.shape[3:])
        return QuantizedPool(native.write_rows(pool.values, rows, layer, page.reshape(-1), slot.reshape(-1)),
                             native.write_rows(pool.scale, scale.reshape(-1, *pool.scale.shape[3:]), layer,
                                               page.reshape(-1), slot.reshape(-1)))
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
    """Pages of each data group's pool: a free list, a reference count per page, and the prefix cache. Pure host
    state.

    A page is free (on the free list), held (reference count >= 1: a running request reads it), or cached and
    unreferenced (evictable, in a least-recently-released order). Prefix cache: a full page whose KV is known good
    is registered under the exact key (its parent's entry id, the page's tokens), where the parent is the entry of
    the page before it in the sequence (`ROOT` for the first page); entry ids are never reused, so a key names one
    chain of tokens from position 0, and there are no hash collisions. A held page is never evicted or handed out
    again; an evicted page's key is dropped (its cached children become unreachable until they are evicted too).

    Args:
      num_groups: data groups, the model's batch shards (`data`, times `expert` in the dp_attention expert mode).
      pages_per_group: pages in each group's pool.
    """

    ROOT = 0  # the parent entry id of a sequence's first page

    def __init__(self, num_groups: int, pages_per_group: int):
        if num_groups < 1 or pages_per_group < 1:
            raise ValueError(f"need at least one group and one page, got {num_groups} groups x {pages_per_group} pages")
        self.num_groups = num_groups
        self.pages_per_group = pages_per_group
        # Stack of free ids; popping from the end hands out low ids first.
        self._free = [list(range(pages_per_group - 1, -1, -1)) for _ in range(num_groups)]
        self._refs = [[0] * pages_per_group for _ in range(num_groups)]
        self._entries: list[dict[tuple, tuple[int, int]]] = [{} for _ in range(num_groups)]  # key -> (id, page)
        self._key_of: list[dict[int, tuple]] = [{} for _ in range(num_groups)]  # cached page -> its key
        self._evictable: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_groups)]  # oldest first
        self._ids = itertools.count(self.ROOT + 1)

    def num_free(self, group: int) -> int:
        """Pages a request could get in `group`: free, or cached and unreferenced (evicted on demand)."""
        return len(self._free[group]) + len(self._evictable[group])

    @property
    def total_free(self) -> int:
        return sum(self.num_free(g) for g in range(self.num_groups))

    def num_cached(self, group: int) -> int:
        """Pages of `group` holding a cache entry, held or evictable."""
        return len(self._key_of[group])

    def refcount(self, group: int, page: int) -> int:
        return self._refs[group][page]

    def is_cached(self, group: int, page: int) -> bool:
        return page in self._key_of[group]

    def allocate(self, group: int, n: int) -> list[int] | None:
        """n fresh local page ids of `group` (each held once), or None (nothing taken) when fewer are free.

        The free list goes first; then cached unreferenced pages are evicted, least recently released first."""
        free, evictable = self._free[group], self._evictable[group]
        if n > len(free) + len(evictable):
            return None
        taken = free[len(free) - min(n, len(free)):][::-1]
        del free[len(free) - len(taken):]
        while len(taken) < n:
            page, _ = evictable.popitem(last=False)
            del self._entries[group][self._key_of[group].pop(page)]
            taken.append(page)
        refs = self._refs[group]
        for page in taken:
            refs[page] = 1
        return taken

    def free(self, group: int, pages: list[int]) -> None:
        """Drop one reference to each page. A page left unreferenced goes back to the free list (the most recently
        freed is reused first) or, when cached, to the end of the eviction order; `pages` is a sequence's table, so
        it is walked backwards: a chain's last page is evicted before its first."""
        refs, free, evictable = self._refs[group], self._free[group], self._evictable[group]
        key_of = self._key_of[group]
        for page in reversed(pages):
            if refs[page] < 1:
                raise RuntimeError(f"double free in data group {group}: page {page} is not held "
                                   f"({len(free)} pages free)")
            refs[page] -= 1
            if refs[page] == 0:
                if page in key_of:
                    evictable[page] = None
                else:
                    free.append(page)

    def match(self, group: int, blocks) -> list[tuple[int, int]]:
        """(entry id, page) of each page of the longest cached chain of `blocks` (each a tuple of one page's
        tokens, from position 0) in `group`; nothing is taken (see `share`)."""
        entries, parent, hits = self._entries[group], self.ROOT, []
        for block in blocks:
            hit = entries.get((parent, block))
            if hit is None:
                break
            hits.append(hit)
            parent = hit[0]
        return hits

    def share(self, group: int, pages: list[int]) -> None:
        """Take one more reference to each of these cached pages (an unreferenced one stops being evictable)."""
        refs, evictable = self._refs[group], self._evictable[group]
        for page in pages:
            if page not in self._key_of[group]:
                raise RuntimeError(f"page {page} of data group {group} is not cached: it cannot be shared")
            if refs[page] == 0:
                del evictable[page]
            refs[page] += 1

    def register(self, group: int, parent: int, block: tuple, page: int) -> int:
        """The entry id of the key (parent, block): the cached one when some page already holds those tokens (this
        page stays uncached), else a new entry for `page`, a held page whose KV holds `block` after the chain
        `parent`."""
        key = (parent, block)
        hit = self._entries[group].get(key)
        if hit is not None:
            return hit[0]
        if self._refs[group][page] < 1 or page in self._key_of[group]:
            raise RuntimeError(f"page {page} of data group {group} cannot be registered: it is "
                               f"{'already cached' if page in self._key_of[group] else 'not held'}")
        entry = next(self._ids)
        self._entries[group][key] = (entry, page)
        self._key_of[group][page] = key
        return entry
