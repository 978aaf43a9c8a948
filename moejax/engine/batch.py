"""The engine's call batches and the compiled step functions that read them.

Host work per call is kept small (it is paid every decode step, see `moejax.bench.decode`): a
call's whole batch is ONE int32 array [B, W] (layout `packed_layout`: tokens, page table, start,
count, sample counter, then the per-request sampling parameters, floats and the uint32 seed as
their int32 bits), handed to the jitted function as numpy and placed by its `in_shardings` (rows
split over the batch shards) in one transfer; positions, the logits index and the typed sampling
arrays are unpacked on device. Padding rows have count 0: positions -1 (no KV write, no attention).

Four compiled steps read it:

- `sampled_step`: the model step (`Steps.step`, every stage in turn) and the sampler; the batch
  is [B, W].
- `pipelined_step`: one tick of the pipeline (`Steps.pipeline_step`); the batch is [S, B, W],
  row s the microbatch stage s works on. `Pipeline` keeps, on the host, which microbatch is at
  which stage, and on device the activations between stages.

- `fed_step`: `sampled_step` for asynchronous scheduling: a row's token may be one a previous call sampled,
  read on device from a small feed buffer the calls keep, so the host packs a call before it knows its tokens.
- `multistep_decode`: K decode steps of a decode batch in one call (`ServeConfig.decode_steps`), a
  `lax.scan` over the model step and the sampler, stop conditions checked on device.

All return the sampled ids with the non-finite flag riding in them: `NONFINITE` (-1) where a
row's logits are not all finite, so the host fetches one array.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moejax import steps as steps_lib
from moejax.engine.sampling import SamplingParams, sample
from moejax.engine.scheduler import Work
from moejax.model.layers import argmax_and_finite

NONFINITE = -1  # the step's id for a row whose logits are not all finite


class Runner(Protocol):
    """What the engine uses of a placed model's compiled steps (`moejax.steps.Steps` is one): the whole interface
    between serving and the model."""

    mesh: jax.sharding.Mesh
    params: dict  # the placed weights, passed to every call

    @property
    def batch_shards(self) -> int: ...  # request groups: each holds its rows and its own KV pool

    @property
    def num_stages(self) -> int: ...

    def new_cache(self, num_pages: int, page_size: int, dtype=None): ...

    def named(self, axes) -> jax.NamedSharding: ...  # the sharding of an array with these logical axes

    def step(self, params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B): ...

    def pipeline_step(self, params, cache, x_SRTD, tokens_SBT, pos_SBT, page_table_SBP, logits_index_SB,
                      active_S): ...

    def new_activations(self, rows: int, num_tokens: int, dtype=None): ...

# Packed batch columns after the T tokens and the P page-table entries (one int32 row per request). FEED: with
# asynchronous scheduling (`fed_step`), where the row's (single) token is the one a previous call sampled, its slot
# in the feed buffer; else -1.
START, NUM, COUNTER, FEED, TOP_K, SEED, TEMPERATURE, TOP_P = range(8)
META = 8  # columns from START on; TOP_K.. are a request's `sampling_row`


def packed_layout(T: int, P: int) -> tuple[slice, slice, int]:
    """Column slices (tokens, page table) and the first meta column of a [B, T + P + META] batch."""
    return slice(0, T), slice(T, T + P), T + P


def packed_width(T: int, P: int) -> int:
    """Columns of a packed batch of T tokens and P page-table entries per row."""
    return T + P + META


def sampling_row(params: SamplingParams, seed: int) -> np.ndarray:
    """A request's packed sampling columns: top_k, seed (uint32 bits), temperature and top_p (float32 bits)."""
    row = np.zeros(META - TOP_K, np.int32)
    row[TOP_K - TOP_K] = params.top_k
    row[SEED - TOP_K] = np.uint32(seed).view(np.int32)
    row[TEMPERATURE - TOP_K] = np.float32(params.temperature).view(np.int32)
    row[TOP_P - TOP_K] = np.float32(params.top_p).view(np.int32)
    return row


def padding(B: int, T: int, P: int) -> np.ndarray:
    """An all-padding packed batch [B, T + P + META] (count 0, greedy, top_p 1)."""
    _, _, m = packed_layout(T, P)
    pad = np.zeros((B, packed_width(T, P)), np.int32)
    pad[:, m + FEED] = -1
    pad[:, m + TOP_K:] = sampling_row(SamplingParams(), 0)
    return pad


def pack(per_group: list[list[Work]], rows: int, T: int, pad: np.ndarray) -> np.ndarray:
    """The packed [groups * rows, W] batch of `per_group` works, group g's works in rows g * rows + i; `pad` is
    the all-padding batch of that shape (`padding`), copied (a fresh array each call: the transfer may alias host
    memory). A single-token work whose token is still on device (`Request.feed_slot` >= 0, asynchronous
    scheduling) gets its FEED slot."""
    tok, table, m = packed_layout(T, pad.shape[1] - T - META)
    packed = pad.copy()
    works = [w for ws in per_group for w in ws]
    if works:
        r = np.array([g * rows + i for g, ws in enumerate(per_group) for i in range(len(ws))])
        n = len(works)  # (concatenate + reshape: a third of np.stack's cost on a few dozen small rows)
        packed[r, table] = np.concatenate([w.req.page_table for w in works]).reshape(n, -1)
        packed[r, m + TOP_K:] = np.concatenate([w.req.sampling_row for w in works]).reshape(n, -1)
        packed[r, m + START:m + COUNTER + 1] = [(w.start, w.num, len(w.req.tokens) - w.req.prompt_len)
                                               for w in works]
        if T == 1:
            packed[r, tok.start] = [w.req.tokens[w.start] for w in works]
            packed[r, m + FEED] = [w.req.feed_slot for w in works]
        else:
            for i, w in zip(r.tolist(), works, strict=True):
                packed[i, : w.num] = w.req.tokens[w.start: w.start + w.num]
    return packed


def host_input(array: np.ndarray, sharding: jax.NamedSharding):
    """A host batch as a compiled step's input. One process: the numpy array itself (placed by the step's
    `in_shardings`, one transfer). Several (multi-host; every process builds the same batch): a global
    array made of each process's own slices, as jit refuses numpy inputs with a sharding there."""
    if jax.process_count() == 1:
        return array
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def device_input(array: np.ndarray, sharding: jax.NamedSharding) -> jax.Array:
    """A host array placed on the devices with `sharding` (every process holds the whole array)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _unpack(packed, T: int):
    """(tokens, positions, page table, logits index) of a packed batch [..., W] (leading dims kept)."""
    tok, table, m = packed_layout(T, packed.shape[-1] - T - META)
    start, num = packed[..., m + START], packed[..., m + NUM]
    t_T = jnp.arange(T, dtype=jnp.int32)
    pos = jnp.where(t_T < num[..., None], start[..., None] + t_T, -1)
    return packed[..., tok], pos, packed[..., table], jnp.maximum(num - 1, 0)


def _sample_rows(logits_BV, packed_BW, T: int):
    """Sample each row with its packed parameters; NONFINITE where its logits are not all finite."""
    _, _, m = packed_layout(T, packed_BW.shape[-1] - T - META)
    col = lambda c: packed_BW[:, m + c]  # noqa: E731
    as_f32 = lambda c: jax.lax.bitcast_convert_type(col(c), jnp.float32)  # noqa: E731
    seed_B = jax.lax.bitcast_convert_type(col(SEED), jnp.uint32)
    ids_B = sample(logits_BV, as_f32(TEMPERATURE), col(TOP_K), as_f32(TOP_P), seed_B, col(COUNTER))
    # The same call as sample's greedy argmax: XLA computes it once.
    return jnp.where(argmax_and_finite(logits_BV)[1], ids_B, NONFINITE)


_SAMPLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MULTISTEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIPELINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampled_step(steps: Runner):
    """`fn(params, cache, packed_BW, num_tokens) -> (ids_B, cache)`, jitted once per `Steps` (engines
    share compilations); `num_tokens` (T, static) splits the columns; the cache is donated."""
    if steps not in _SAMPLED:
        batch = steps.named(steps_lib.BATCH)

        def fn(params, cache, packed_BW, num_tokens):
            packed_BW = jax.sharding.reshard(packed_BW, batch)  # types the rows as split (already placed so)
            tokens_BT, pos_BT, table_BP, index_B = _unpack(packed_BW, num_tokens)
            logits_BV, _, cache = steps.step(params, cache, tokens_BT, pos_BT, table_BP, index_B)
            return _sample_rows(logits_BV, packed_BW, num_tokens), cache

        _SAMPLED[steps] = jax.jit(fn, in_shardings=(None, None, batch), donate_argnums=(1,), static_argnums=(3,))
    return _SAMPLED[steps]


def fed_step(steps: Runner):
    """`fn(params, cache, feed_GN, packed_BW, num_tokens, offset) -> (ids_B, cache, feed_GN)`: `sampled_step` for
    asynchronous scheduling, jitted once per `Steps`.

    `feed_GN` [batch shards, N] holds the ids the previous calls sampled, each data group's in its own row: a
    single-token row with FEED slot s >= 0 takes its token from feed_GN[its group, s] (a NONFINITE id feeds token
    0: that request fails when the host reads the id, and this row's result is dropped), so a call can be
    dispatched before the host has read its input tokens. The call's own ids are written to each group's row at
    columns [offset, offset + rows) (`offset` static). Cache and feed donated."""
    if steps not in _FED:
        batch = steps.named(steps_lib.BATCH)

        def fn(params, cache, feed_GN, packed_BW, num_tokens, offset):
            packed_BW = jax.sharding.reshard(packed_BW, batch)
            G, (B, W) = feed_GN.shape[0], packed_BW.shape
            tok, _, m = packed_layout(num_tokens, W - num_tokens - META)
            if num_tokens == 1:
                packed_GRW = packed_BW.reshape(G, B // G, W)
                slot_GR = packed_GRW[..., m + FEED]
                fed_GR = jnp.take_along_axis(feed_GN, jnp.maximum(slot_GR, 0), axis=1)
                tokens_GR = jnp.where(slot_GR >= 0, jnp.maximum(fed_GR, 0), packed_GRW[..., tok.start])
                packed_BW = packed_GRW.at[..., tok.start].set(tokens_GR).reshape(B, W)
            tokens_BT, pos_BT, table_BP, index_B = _unpack(packed_BW, num_tokens)
            logits_BV, _, cache = steps.step(params, cache, tokens_BT, pos_BT, table_BP, index_B)
            ids_B = _sample_rows(logits_BV, packed_BW, num_tokens)
            feed_GN = jax.lax.dynamic_update_slice(feed_GN, ids_B.reshape(G, B // G), (0, offset))
            return ids_B, cache, feed_GN

        _FED[steps] = jax.jit(fn, in_shardings=(None, None, batch, batch), donate_argnums=(1, 2),
                              static_argnums=(4, 5))
    return _FED[steps]


def multistep_decode(steps: Runner):
    """`fn(params, cache, packed_BW, limits_BX, num_steps) -> (ids_BK, cache)`: `num_steps` (K, static) decode
    steps of a [B, 1 + P + META] decode batch in one call, each sampled token fed to the next step.

    `limits_BX` (`decode_limits`): column 0 the most steps a row may take (0: padding), then its stop token ids
    (-1 padded). A row stops (count 0: no KV write, no attention) after a stop token, a non-finite row
    (NONFINITE) or its step limit; step i of a row runs at position start + i with sample counter counter + i,
    exactly as the i-th of K single-step calls would. ids_BK[b, i] is row b's token of step i (meaningless after
    it stopped: the host discards those, as it commits tokens in order). Cache donated, jitted once per `Steps`."""
    if steps not in _MULTISTEP:
        batch = steps.named(steps_lib.BATCH)

        def fn(params, cache, packed_BW, limits_BX, num_steps):
            packed_BW = jax.sharding.reshard(packed_BW, batch)
            limits_BX = jax.sharding.reshard(limits_BX, batch)
            tok, _, m = packed_layout(1, packed_BW.shape[-1] - 1 - META)
            steps_B, stops_BX = limits_BX[:, 0], limits_BX[:, 1:]

            def body(carry, i):
                cache_, tokens_B, done_B = carry
                live_B = ~done_B & (i < steps_B)
                packed_i = (packed_BW.at[:, tok.start].set(tokens_B)
                            .at[:, m + START].add(i).at[:, m + COUNTER].add(i)
                            .at[:, m + NUM].set(live_B.astype(jnp.int32)))
                tokens_BT, pos_BT, table_BP, index_B = _unpack(packed_i, 1)
                logits_BV, _, cache_ = steps.step(params, cache_, tokens_BT, pos_BT, table_BP, index_B)
                ids_B = _sample_rows(logits_BV, packed_i, 1)
                stop_B = (ids_B == NONFINITE) | jnp.any(ids_B[:, None] == stops_BX, axis=-1)
                done_B = done_B | ~live_B | stop_B
                return (cache_, jnp.where(done_B, tokens_B, ids_B), done_B), ids_B

            start = (cache, packed_BW[:, tok.start], steps_B <= 0)
            (cache, _, _), ids_KB = jax.lax.scan(body, start, jnp.arange(num_steps, dtype=jnp.int32))
            return ids_KB.T, cache

        _MULTISTEP[steps] = jax.jit(fn, in_shardings=(None, None, batch, batch), donate_argnums=(1,),
                                    static_argnums=(4,))
    return _MULTISTEP[steps]


def decode_limits(per_group: list[list[Work]], rows: int, num_steps: int) -> np.ndarray:
    """The [groups * rows, 1 + X] limits of `multistep_decode`: each work's most steps (at most `num_steps`, never
    past max_new_tokens) and its stop ids, -1 padded to X, a power of two >= 4 (few shapes to compile)."""
    works = [w for ws in per_group for w in ws]
    width = 4
    while width < max((len(w.req.params.stop_token_ids) for w in works), default=0):
        width *= 2
    limits = np.full((len(per_group) * rows, 1 + width), -1, np.int32)
    limits[:, 0] = 0
    for g, ws in enumerate(per_group):
        for i, w in enumerate(ws):
            req = w.req
            limits[g * rows + i, 0] = min(num_steps, req.params.max_new_tokens - req.num_output)
            stops = req.params.stop_token_ids
            limits[g * rows + i, 1:1 + len(stops)] = stops
    return limits


def pipelined_step(steps: Runner):
    """`fn(params, cache, x_SRTD, packed_SBW, active_S, num_tokens) -> (ids_B, x_SRTD, cache)`: one
    pipeline tick; ids are those of the microbatch leaving the last stage (row S - 1's parameters).
    Cache and activations are donated."""
    if steps not in _PIPELINED:
        staged, per_stage = steps.named(steps_lib.STAGED), steps.named(("layers",))
        unstaged = steps.named((None, "batch", None))

        def fn(params, cache, x_SRTD, packed_SBW, active_S, num_tokens):
            packed_SBW = jax.sharding.reshard(packed_SBW, staged)
            active_S = jax.sharding.reshard(active_S, per_stage)
            tokens, pos, table, index = _unpack(packed_SBW, num_tokens)
            logits_BV, x_SRTD, cache = steps.pipeline_step(params, cache, x_SRTD, tokens, pos, table, index, active_S)
            last_BW = jax.sharding.reshard(packed_SBW, unstaged)[-1]  # sampling rows of the leaving microbatch
            return _sample_rows(logits_BV, last_BW, num_tokens), x_SRTD, cache

        _PIPELINED[steps] = jax.jit(fn, in_shardings=(None, None, None, staged, per_stage),
                                    donate_argnums=(1, 2), static_argnums=(5,))
    return _PIPELINED[steps]


@dataclass
class Microbatch:
    """What one data-group-split batch sends into a pipeline: its works per data group and packed rows."""

    works: list[list]  # per data group
    packed: np.ndarray  # [data groups, rows, W]

    @property
    def rows(self) -> int:
        return self.packed.shape[1]


class Pipeline:
    """The microbatches in flight in one pipelined compiled step (prefill chunks, or decode tokens).

    `in_flight[s]` is the microbatch that stage s + 1 works on next tick (None: none); `x` the
    activations on device, [S, data groups x capacity, T, D], allocated on first use.
    """

    def __init__(self, steps: Runner, num_tokens: int, capacity: int, groups: int):
        self.steps, self.T, self.capacity, self.groups = steps, num_tokens, capacity, groups
        self.stages = steps.num_stages
        self.in_flight: collections.deque[Microbatch | None] = collections.deque([None] * (self.stages - 1))
        self.x = None
        self._fn = pipelined_step(steps)
        self._shardings = steps.named(steps_lib.STAGED), steps.named(("layers",))

    @property
    def busy(self) -> bool:
        return any(mb is not None for mb in self.in_flight)

    def tick(self, params, cache, entering: Microbatch | None, pad: np.ndarray):
        """Advance one tick with `entering` at stage 0. Returns (the microbatch leaving the last stage
        or None, its ids' future or None, the cache). Asynchronous.

        `pad` is an all-padding packed batch [data, >= rows, W] of this pipeline's T."""
        stages = [entering, *self.in_flight]
        self.in_flight.appendleft(entering)
        leaving = self.in_flight.pop()
        rows = max(mb.rows for mb in stages if mb is not None)
        packed = np.repeat(pad[None, :, :rows], self.stages, axis=0)  # fresh: the transfer may alias it
        for s, mb in enumerate(stages):
            if mb is not None:
                packed[s, :, : mb.rows] = mb.packed
        active = np.array([mb is not None for mb in stages])
        ids_B, cache = self._call(params, cache, packed.reshape(self.stages, self.groups * rows, -1), active)
        return leaving, (ids_B if leaving is not None else None), cache

    def warm(self, params, cache, packed_BW: np.ndarray):
        """Compile (and run, every stage idle: nothing is written) the tick for an all-padding batch."""
        ids_B, cache = self._call(params, cache, *self._idle(packed_BW))
        jax.block_until_ready(ids_B)
        return cache

    def lower(self, params, cache, packed_BW: np.ndarray):
        """The tick for an all-padding batch `packed_BW`, lowered and compiled (from the jit cache)."""
        return self._fn.lower(params, cache, self._activations(), *self._idle(packed_BW), self.T).compile()

    def _idle(self, packed_BW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packed [S, B, W], active [S]) of a tick in which every stage holds `packed_BW` and none works."""
        return np.repeat(packed_BW[None], self.stages, axis=0), np.zeros(self.stages, bool)

    def _activations(self):
        if self.x is None:  # allocated on first use
            self.x = self.steps.new_activations(self.groups * self.capacity, self.T)
        return self.x

    def _call(self, params, cache, packed_SBW: np.ndarray, active_S: np.ndarray):
        ids_B, self.x, cache = self._fn(params, cache, self._activations(), host_input(packed_SBW, self._shardings[0]),
                                        host_input(active_S, self._shardings[1]), self.T)
        return ids_B, cache
