"""Disaggregated serving: prompts prefilled on one placed model, decoded on another, KV pages moved between.

`Engine(decode_model, config, prefill_model=prefill_model)` (`moejax.engine.engine`) keeps two sides:

- the prefill side (`PrefillSide`): the prefill model's own KV pools (`num_pages` per prefill data group), its
  own scheduler (`Scheduler(prefill_only=True)`: prefill chunks only, FCFS admission, preemption within its pool,
  the prefix cache when `enable_prefix_caching`: a hit skips prefill chunks there, and the cached pages move like
  the others) and its compiled step. A request's last chunk samples its first token there.
- the decode side: the engine's own scheduler, pools and steps, on the decode model. A request arrives with its
  KV (`Scheduler.place`: a data group and microbatch group with a free slot and the pages of its sequence) and
  only decodes. A request preempted there goes back to the prefill side's queue and is prefilled again.

Between them `KVTransfer` moves a request's pages: gathered from the prefill pools (the KV of its computed
positions, whole pages), re-laid out for the decode side (cache layers by stage, kv heads replicated up to each
side's `tensor`), put on the decode devices with `jax.device_put` in the decode pools' sharding (pages
replicated, heads over tensor, layers over stage), and written into the pages the decode side gave it. The bytes
moved are exactly pages x page bytes (`page_bytes`), what the planner's transfer term counts. The two sides'
calls are dispatched before either's ids are read, so prefill of new requests runs while the running ones decode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kv_cache import PageAllocator
from moejax.model.attention import CACHE_PREFIX


def page_bytes(steps, page_size: int, dtype) -> int:
    """Bytes of one KV page over every real layer and kv head of the model (what a transfer moves per page): the
    pools of `steps.new_cache` without the stage padding layers or the kv heads replicated for `tensor`."""
    geo, cfg = steps.geometry, steps.cfg
    groups = steps.batch_shards  # one page per group: the pools' page axis is split over them
    pools = jax.eval_shape(lambda: steps.new_cache(groups, page_size, dtype))
    total = 0
    for pool, axes in zip(pools, steps.cache_axes, strict=True):
        for part in jax.tree.leaves(pool):
            n = math.prod(part.shape) // (geo.num_cache_layers * groups) * cfg.num_layers
            if "kv_heads" in axes:
                n = n // geo.num_kv_heads * cfg.num_kv_heads
            total += n * jnp.dtype(part.dtype).itemsize
    return total


def _cache_layers(geo) -> np.ndarray:
    """The cache layer of each real layer: stage s's j-th layer is s * layers per stage + j."""
    per = geo.cache_layers_per_stage
    return np.array([s * per + j for s, n in enumerate(geo.stage_layers) for j in range(n)], np.int32)


class KVTransfer:
    """Moves a request's KV pages from a source model's pools to a destination model's (same model config and KV
    format, any two layouts and device sets). Call it with global page ids; returns the destination pools
    (donated) and the bytes moved."""

    def __init__(self, src_steps, dst_steps):
        src_geo, dst_geo, cfg = src_steps.geometry, dst_steps.geometry, src_steps.cfg
        self.src, self.dst = src_steps, dst_steps
        self._src_layers, self._dst_layers = _cache_layers(src_geo), _cache_layers(dst_geo)
        # Stored kv head k of a side is real head k // repeat; each real head is read from its first copy.
        src_rep, dst_rep = src_geo.num_kv_heads // cfg.num_kv_heads, dst_geo.num_kv_heads // cfg.num_kv_heads
        self._real_heads = np.arange(cfg.num_kv_heads, dtype=np.int32) * src_rep
        self._dst_heads = np.arange(dst_geo.num_kv_heads, dtype=np.int32) // dst_rep
        self._dst_repeats = dst_rep > 1  # the destination stores kv heads repeated up to its `tensor`
        self._head_axes = tuple(CACHE_PREFIX.__len__() + list(axes[len(CACHE_PREFIX):]).index("kv_heads")
                                if "kv_heads" in axes else None for axes in src_steps.cache_axes)
        self._gather = jax.jit(self._gather_fn)
        self._scatter = jax.jit(self._scatter_fn, donate_argnums=(0,))

    def _gather_fn(self, cache, page_ids):
        """[real layers, n, page, (real kv heads,) ...] of each pool part at `page_ids` (source mesh)."""
        whole = jax.sharding.PartitionSpec()  # the moved pages gathered whole on the source devices

        def take(part, head_axis):
            part = part.at[self._src_layers[:, None], page_ids[None, :]].get(out_sharding=whole)
            if head_axis is None:
                return part
            return jnp.moveaxis(jnp.moveaxis(part, head_axis, 0).at[self._real_heads].get(out_sharding=whole),
                                0, head_axis)
        return tuple(jax.tree.map(lambda p, h=h: take(p, h), pool)
                     for pool, h in zip(cache, self._head_axes, strict=True))

    def _scatter_fn(self, cache, pages, page_ids):
        """`cache` with `pages` (gathered by `_gather_fn`) written at `page_ids` (destination mesh)."""
        def put(part, moved, head_axis):
            if head_axis is not None and self._dst_repeats:  # landed whole: repeat the real heads
                moved = jnp.take(moved, self._dst_heads, axis=head_axis)
            return part.at[self._dst_layers[:, None], page_ids[None, :]].set(
                moved.astype(part.dtype), out_sharding=jax.typeof(part).sharding)
        return tuple(jax.tree.map(lambda c, m, h=h: put(c, m, h), pool, moved)
                     for pool, moved, h in zip(cache, pages, self._head_axes, strict=True))

    def _landing(self, pages, dst_cache):
        """Shardings on the destination mesh for the moved pages: the destination pools' with pages (and the
        stage-split layer axis, as the pages hold real layers only) replicated, so each device receives its own kv
        heads; whole where the destination repeats kv heads (fewer than its `tensor`)."""
        def spec_of(part, like):
            spec = list(like.sharding.spec) + [None] * (part.ndim - len(like.sharding.spec))
            spec[0] = spec[1] = None
            if self._dst_repeats:
                spec = [None] * part.ndim
            return jax.sharding.NamedSharding(like.sharding.mesh, jax.sharding.PartitionSpec(*spec))
        return tuple(jax.tree.map(spec_of, pool, like) for pool, like in zip(pages, dst_cache, strict=True))

    def __call__(self, src_cache, dst_cache, src_ids: np.ndarray, dst_ids: np.ndarray):
        """Copy pages src_ids (global ids in the source pools) to dst_ids (in the destination's). Asynchronous."""
        with jax.set_mesh(self.src.mesh):
            pages = self._gather(src_cache, np.asarray(src_ids, np.int32))
        pages = jax.device_put(pages, self._landing(pages, dst_cache))
        with jax.set_mesh(self.dst.mesh):
            dst_cache = self._scatter(dst_cache, pages, np.asarray(dst_ids, np.int32))
        return dst_cache, sum(leaf.nbytes for leaf in jax.tree.leaves(pages))


def global_ids(pages: list[int], group: int, num_pages: int) -> np.ndarray:
    """Global page ids (into the pools' page axis) of a data group's local page ids."""
    return np.asarray(pages, np.int32) + group * num_pages


class PrefillSide:
    """The prefill model of a disaggregated engine: its pools, allocator, scheduler and compiled step."""

    def __init__(self, model, engine_config, pool_dtype, pages_per_seq: int):
        from moejax.engine import batch as batch_lib
        from moejax.engine.scheduler import Scheduler
        from moejax.steps import BATCH

        c = engine_config
        self.model, self.steps = model, model.steps
        self.groups = self.steps.batch_shards
        self.allocator = PageAllocator(self.groups, c.num_pages)
        self.scheduler = Scheduler(self.allocator, c.page_size, c.max_prefill_seqs, c.chunk_size, c.max_prefill_seqs,
                                   prefix_caching=c.enable_prefix_caching, prefill_only=True)
        self.cache = self.steps.new_cache(c.num_pages * self.groups, c.page_size, pool_dtype)
        self._fn = batch_lib.sampled_step(self.steps)
        self._sharding = self.steps.named(BATCH)
        self._pad = batch_lib.padding(self.groups * c.max_prefill_seqs, c.chunk_size, pages_per_seq)
        self.rows, self.T = c.max_prefill_seqs, c.chunk_size

    def launch(self, per_group):
        """Dispatch one prefill call (asynchronous): None when nothing runs, else (per_group, the ids' future)."""
        from moejax.engine import batch as batch_lib

        if not any(per_group):
            return None
        with jax.set_mesh(self.steps.mesh):
            packed = batch_lib.host_input(batch_lib.pack(per_group, self.rows, self.T, self._pad), self._sharding)
            ids_B, self.cache = self._fn(self.steps.params, self.cache, packed, self.T)
        return per_group, ids_B

    def compiled_step(self, rows: int):
        """The compiled prefill call with `rows` per data group, from the jit cache."""
        from moejax.engine import batch as batch_lib

        packed = batch_lib.padding(self.groups * rows, self.T, self._pad.shape[1] - self.T - batch_lib.META)
        with jax.set_mesh(self.steps.mesh):
            return self._fn.lower(self.steps.params, self.cache, packed, self.T).compile()

    def warmup(self) -> None:
        from moejax.engine import batch as batch_lib

        with jax.set_mesh(self.steps.mesh):
            ids_B, self.cache = self._fn(self.steps.params, self.cache,
                                         batch_lib.host_input(self._pad, self._sharding), self.T)
            jax.block_until_ready(ids_B)
