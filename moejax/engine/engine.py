"""The serving engine: requests in, a jitted prefill-chunk step and a jitted decode step per engine step.

Each `Engine.step()` asks the scheduler for a plan, builds numpy batches, dispatches (at most) one
prefill-chunk call [data * max_prefill_seqs, chunk_size] and one decode call [data * bucket, 1]
of the same compiled step function (model step + on-device sampler, KV pools donated), then reads
back only the sampled ids. Shapes are static: the prefill shape is fixed by the config, the decode
batch per data group is rounded up to one of `decode_buckets`; `warmup()` compiles them all.

Pipeline parallelism (a layout with `stage` > 1): running requests are split into
`ServeConfig.microbatches` groups (default: one per stage), and a step is one pipeline tick: group
t mod M enters stage 0 while stage s works on what entered s ticks ago (`moejax.engine.batch`:
one pipelined call for prefill chunks, one for decode tokens, each with its own activations
between stages). A microbatch's tokens come out of the last stage S - 1 steps after it entered;
a request is not scheduled again while its work is in flight, so with M >= S every stage is busy
and each group makes a token every M steps. With M = 1 the engine runs the sequential schedule
instead: one call takes the batch through every stage in turn (`Steps.step`).

An abort or a preemption frees a request's pages at once even while its work is in flight: each
stage runs its microbatches in entry order, so the stale work writes its stage's KV before any
later owner of the pages reaches that stage, and its tokens are dropped when it leaves.

Batch rows are split evenly over the data groups (row b belongs to group b // (B / groups)), and
each row's page table holds that group's local page ids (see `moejax.kv_cache`). A data group is
one batch shard of the model (`Model.batch_shards`): a `data` replica, or in the "dp_attention" expert mode
one (data, expert) pair, since attention is data-parallel over the expert axis too.

A call's whole batch is one packed int32 array (`moejax.engine.batch`). Each request keeps its
page-table row (`Request.page_table`, kept by the scheduler) and its packed sampling fields
(`Request.sampling_row`), so building a batch is a few vectorised copies.

Numerical isolation: the compiled step also checks, per row, that all the logits are finite, and
returns -1 instead of a token id where they are not (no extra transfer). Such a request finishes
with reason "error" and a message, and its pages are freed; the others are unaffected.

Prefix caching (`ServeConfig.enable_prefix_caching`, `moejax.engine.scheduler`): a request admitted with a cached
prefix of full pages holds them by reference and its first work starts after them; the device reads pages by table
and position, so a hit only skips prefill chunks. `_commit` registers a request's full pages when it commits a
finite token.

Multi-step decode (`ServeConfig.decode_steps` K > 1): a step that only decodes, with nobody waiting and the pages
of its K tokens free, runs K decode steps in one call (`moejax.engine.batch.multistep_decode`, rows stopping on
device); `_commit_steps` commits each row's tokens in order as K single steps would.

Asynchronous scheduling (`ServeConfig.async_scheduling`): `step()` schedules, packs and dispatches its calls
(`_launch_fed`) before it reads the ids of the calls the step before dispatched, so the host's work overlaps the
device's. A request is advanced when its work is dispatched: its computed count, and a placeholder for the token it
samples (`Request.pending`), which the next call reads on device from the feed buffer (`batch.fed_step`) and the
host replaces when it reads the ids. A request that finishes at step t was scheduled at t + 1 already: that work
is dropped (its KV writes land before any later owner's, as the device runs calls in order); a preemption drops a
request's pending tokens, to be sampled again (the seeded sampler keys on the output count).

Request ids are `str` or `int`, kept as given and compared as given everywhere (`5` and `"5"` are
two ids). Finished records stay in `Engine.requests` until `max_finished_retained` newer finished
requests have been delivered, or until `release()`; `on_finish` sees each one as it is delivered.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import numpy as np

from moejax import steps as steps_lib
from moejax.distributed import fetch
from moejax.engine import batch as batch_lib
from moejax.engine import disagg
from moejax.engine.batch import NONFINITE, Microbatch, Pipeline
from moejax.engine.config import INT32_MAX, ServeConfig
from moejax.engine.sampling import SamplingParams, check_context, check_prompt
from moejax.engine.scheduler import Request, RequestId, Scheduler, Work
from moejax.fit import check_fits, kv_cache_bytes
from moejax.kv_cache import PageAllocator, pages_for

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether (and why) it finished."""

    request_id: RequestId
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"


@dataclass
class EngineStats:
    """Counters since the engine was built (`Engine.stats`).

    Prompt tokens count per admission: a request admitted again after a preemption counts its sequence again
    (prompt and outputs so far, all recomputed but for a cache hit), so `cached_prompt_tokens / prompt_tokens` is
    the prefix cache's hit rate over what admissions had to prefill.
    """

    steps: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    preemptions: int = 0
    mixed_steps: int = 0  # steps that ran a prefill chunk and a decode together
    bubbles: int = 0  # pipeline calls in which the first stage had nothing to do (the others had)
    nonfinite: int = 0  # requests finished with "error" because their logits were not all finite
    prompt_tokens: int = 0  # tokens of the sequences admitted (see above)
    cached_prompt_tokens: int = 0  # of those, served from the prefix cache (their prefill chunks skipped)
    prefill_tokens: int = 0  # tokens scheduled in prefill calls (chunks), dropped work included
    multistep_calls: int = 0  # decode calls that ran `decode_steps` > 1 steps
    kv_transfers: int = 0  # disaggregated: requests whose KV pages moved from the prefill side
    kv_transfer_bytes: int = 0  # the bytes those moves carried
    host_s: float = 0.0  # wall time of step() outside waiting for device results
    dispatch_s: float = 0.0  # the part of host_s spent inside the compiled calls until they return
    device_wait_s: float = 0.0


class Engine:
    """In-flight batching over a paged KV cache for one placed `moejax.Model`.

    Args:
      model: a `moejax.Model` (weights on its mesh).
      config: `ServeConfig`.
      on_finish: called with each finished `Request` (its tokens, timings, finish reason) when
        its last output is delivered by `step()`: the way to keep metrics of every request, as
        `Engine.requests` keeps only the newest finished ones. It must not raise.
      prefill_model: disaggregated serving (`moejax.engine.disagg`): a `moejax.Model` of the same checkpoint,
        dtype and KV format on other devices (`moejax.load(..., devices=...)`), any layout, that prefills every
        prompt; `model` then only decodes, each request's KV pages moved to it after its prefill. None: `model`
        does both.
    """

    def __init__(self, model, config: ServeConfig | None = None,
                 on_finish: Callable[[Request], None] | None = None, prefill_model=None):
        config = ServeConfig() if config is None else config
        if not isinstance(config, ServeConfig):
            raise ValueError(f"config must be a ServeConfig, got {type(config).__name__}")
        self.model, self.config, self.on_finish = model, config, on_finish
        # The compiled steps and the weights: the engine uses batch_shards, num_stages, new_cache, params and
        # mesh here, and `moejax.engine.batch` the steps themselves.
        self.steps = steps = model.steps
        self.groups = steps.batch_shards  # request groups: data, x expert in the dp_attention expert mode
        self.max_len = config.max_model_len or model.cfg.max_position_embeddings
        self.stages = steps.num_stages
        self.microbatches = config.microbatches or self.stages
        self._check_config(config)
        self.slots = config.max_running // (self.groups * self.microbatches)  # per data group and microbatch group
        self.decode_buckets = tuple(sorted(config.decode_buckets or _powers_of_two(self.slots)))
        self.pages_per_seq = pages_for(self.max_len, config.page_size)
        # The pools' format: the config's, else the model's (`moejax.load(..., kv_cache_dtype=...)`), else float.
        self.kv_cache_dtype = config.kv_cache_dtype or getattr(model, "kv_cache_dtype", None)
        pool_dtype = self.kv_cache_dtype or model.dtype
        check_fits(f"the KV cache ({config.num_pages} pages of {config.page_size} tokens per data group)",
                   kv_cache_bytes(steps, config.num_pages * self.groups, config.page_size, pool_dtype),
                   steps.mesh.devices.flat,
                   "lower ServeConfig.num_pages or page_size"
                   + ", use kv_cache_dtype 'fp8' or 'int8' (1 byte per value)" * (self.kv_cache_dtype is None)
                   + ", or use a layout with more tensor or stage devices (they split the pools)")
        self.allocator = PageAllocator(self.groups, config.num_pages)
        self.scheduler = Scheduler(self.allocator, config.page_size, self.slots, config.chunk_size,
                                   config.max_prefill_seqs, self.microbatches, config.enable_prefix_caching)
        self.prefill = self.transfer = None  # disaggregated: the prefill side and the KV transfer to this one
        if prefill_model is not None:
            self._check_prefill_model(prefill_model, pool_dtype)
            self.prefill = disagg.PrefillSide(prefill_model, config, pool_dtype, self.pages_per_seq)
            self.transfer = disagg.KVTransfer(prefill_model.steps, steps)
            self.scheduler.requeue = self.prefill.scheduler.add  # preempted: prefilled again
            self.scheduler.prefix_caching = False  # the prefill side's pools hold the prefix cache
        self.cache = steps.new_cache(config.num_pages * self.groups, config.page_size, pool_dtype)
        self._fn = batch_lib.sampled_step(steps)
        self._multistep = batch_lib.multistep_decode(steps) if config.decode_steps > 1 else None
        self._fed = batch_lib.fed_step(steps) if config.async_scheduling else None
        self._batch_sharding = steps.named(steps_lib.BATCH)
        # Pipelined (stages and microbatches > 1): the prefill and the decode pipelines, each with its
        # microbatches in flight. Otherwise each call takes its batch through every stage in turn.
        self._pipes = None if self.stages == 1 or self.microbatches == 1 else {
            "decode": Pipeline(steps, 1, self.decode_buckets[-1], self.groups),
            "prefill": Pipeline(steps, config.chunk_size, config.max_prefill_seqs, self.groups)}
        self._ticks = 0
        # Asynchronous scheduling: the calls dispatched by the last step (their ids not read yet), and the device
        # buffer of the ids they sampled: per data group, the prefill rows' then the decode rows'.
        self._inflight: list[tuple[list[list[Work]], jax.Array]] = []
        self._feed = None if self._fed is None else batch_lib.device_input(
            np.zeros((self.groups, config.max_prefill_seqs + self.decode_buckets[-1]), np.int32), self._batch_sharding)
        # Live requests, and finished ones until `max_finished_retained` newer ones were delivered.
        self.requests: dict[RequestId, Request] = {}
        self._delivered: collections.deque[Request] = collections.deque()  # finished, oldest first
        self._pending: list[tuple[Request, RequestOutput]] = []  # abort outputs, delivered by the next step()
        self._order = itertools.count()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self._pad: dict[tuple[int, int], np.ndarray] = {}
        self.stats = EngineStats()

    def _check_prefill_model(self, prefill_model, pool_dtype) -> None:
        """A prefill model this decode model can take KV from, its pools fitting its devices (ValueError)."""
        c, model = self.config, self.model
        if prefill_model.cfg != model.cfg:
            raise ValueError(f"prefill_model is {prefill_model.cfg.name or 'a model'} and the decode model "
                             f"{model.cfg.name or 'another'}: they must be the same checkpoint's (configs differ)")
        if prefill_model.dtype != model.dtype:
            raise ValueError(f"prefill_model serves in {np.dtype(prefill_model.dtype).name}, the decode model in "
                             f"{np.dtype(model.dtype).name}: load both with the same dtype")
        prefill_kv = c.kv_cache_dtype or getattr(prefill_model, "kv_cache_dtype", None)
        if prefill_kv != self.kv_cache_dtype:
            raise ValueError(f"prefill_model's KV cache format ({prefill_kv or 'the serving dtype'}) differs from "
                             f"the decode model's ({self.kv_cache_dtype or 'the serving dtype'}): the pages move as "
                             f"they are; load both with the same kv_cache_dtype")
        for name, value in (("async_scheduling", c.async_scheduling), ("decode_steps > 1", c.decode_steps > 1)):
            if value:
                raise ValueError(f"ServeConfig.{name.split()[0]} is not supported with a prefill_model (disaggregated "
                                 f"serving) yet; turn it off")
        steps = prefill_model.steps
        check_fits(f"the prefill model's KV cache ({c.num_pages} pages of {c.page_size} tokens per data group)",
                   kv_cache_bytes(steps, c.num_pages * steps.batch_shards, c.page_size, pool_dtype),
                   steps.mesh.devices.flat, "lower ServeConfig.num_pages or page_size")

    def _check_config(self, c: ServeConfig) -> None:
        layout = self.model.layout
        groups = (f"data {layout.data} x expert {layout.expert}, expert mode 'dp_attention'"
                  if self.groups != layout.data else f"data {layout.data}")
        unit = self.groups * self.microbatches
        if c.max_running % unit:
            raise ValueError(f"ServeConfig.max_running ({c.max_running}) must be a multiple of the data groups "
                             f"({self.groups} = {groups}) of layout {layout} times microbatches "
                             f"({self.microbatches}{'' if c.microbatches else ' = stages, the default'}): e.g. "
                             f"{unit * max(1, c.max_running // unit)}")
        if self.max_len > self.model.cfg.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_len}) exceeds the model's max_position_embeddings "
                             f"({self.model.cfg.max_position_embeddings}); use at most that")
        slots = c.max_running // (self.groups * self.microbatches)
        if c.decode_buckets and max(c.decode_buckets) < slots:
            raise ValueError(f"decode_buckets {c.decode_buckets} must reach the slots per data group and microbatch "
                             f"group ({slots} = max_running / (data groups x microbatches)); add a bucket of at "
                             f"least that")
        if c.async_scheduling and self.stages > 1 and self.microbatches > 1:
            raise ValueError(f"ServeConfig.async_scheduling does not run pipelined microbatches (layout {layout}: "
                             f"{self.stages} stages, {self.microbatches} microbatches), whose ticks overlap already; "
                             f"turn it off, or set microbatches=1 (the CLI: --microbatches 1)")
        if c.num_pages * self.groups > INT32_MAX:
            raise ValueError(f"ServeConfig.num_pages ({c.num_pages}) times data groups ({self.groups}) exceeds "
                             f"2**31 - 1 pages; lower num_pages")

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams | None = None,
                    request_id: RequestId | None = None) -> RequestId:
        """Queue a request; returns its id (`request_id` as given, or a fresh "req-N").

        Raises ValueError (engine state untouched) on bad input, or when `request_id` is live.
        """
        params = SamplingParams() if params is None else params
        return self._add(self._check_request(prompt_ids, params), params, self._check_id(request_id)).request_id

    def _add(self, prompt: list[int], params: SamplingParams, rid: RequestId | None) -> Request:
        if rid is None:
            rid = f"req-{next(self._ids)}"
            while rid in self.requests:  # never take an id a user gave (live or retained)
                rid = f"req-{next(self._ids)}"
        seed = int(params.seed) if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(rid, next(self._order), len(prompt), prompt, params, seed, arrival_s=time.perf_counter(),
                      page_table=np.zeros(self.pages_per_seq, np.int32),
                      sampling_row=batch_lib.sampling_row(params, seed))
        self.requests[rid] = req
        (self.scheduler if self.prefill is None else self.prefill.scheduler).add(req)
        return req

    def _check_id(self, request_id) -> RequestId | None:
        """The id as given (numpy integers as int); ValueError unless None, a str or an int, not live."""
        if request_id is None:
            return None
        if isinstance(request_id, (bool, np.bool_)) or not isinstance(request_id, (str, int, np.integer)):
            raise ValueError(f"request_id must be a str or an int, got {request_id!r} "
                             f"({type(request_id).__name__})")
        rid = int(request_id) if isinstance(request_id, np.integer) else request_id
        if rid in self.requests and not self.requests[rid].finished:
            raise ValueError(f"request id {rid!r} is already running; wait for it to finish, abort it, or pick "
                             f"another id")
        return rid

    def _check_request(self, prompt_ids, params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model.cfg.vocab_size
        prompt = check_prompt(prompt_ids, vocab)
        params.check(vocab)
        check_context(len(prompt), params.max_new_tokens, self.max_len)
        total = len(prompt) + params.max_new_tokens
        need, have = pages_for(total, self.config.page_size), self.config.num_pages
        if need > have:
            raise ValueError(f"request needs {need} KV pages ({total} tokens at page_size {self.config.page_size}) "
                             f"but the whole pool of a data group has {have} pages")
        return prompt

    def abort(self, request_id: RequestId) -> bool:
        """Stop a live request now (pages freed); the next step() reports finish reason "abort".

        Ids compare as given (`5` and `"5"` differ). Returns False (nothing done) when no live
        request has this id.
        """
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._owner(req).remove(req)
        self._finish(req, "abort", time.perf_counter())
        self._pending.append((req, RequestOutput(req.request_id, [], True, "abort")))
        return True

    def release(self, request_id: RequestId) -> Request | None:
        """Forget a finished request now (its record and metrics); returns it."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            return self.requests.pop(request_id)
        return None

    def has_unfinished(self) -> bool:
        """True while a request runs or waits, or an output (an abort's) is still to be returned by step()."""
        return (self.scheduler.has_work() or bool(self._pending) or bool(self._inflight)
                or (self.prefill is not None and self.prefill.scheduler.has_work()))

    def _owner(self, req: Request) -> Scheduler:
        """The scheduler holding `req`: the decode side's, or (disaggregated) the prefill side's."""
        if self.prefill is not None and self.prefill.scheduler.holds(req):
            return self.prefill.scheduler
        return self.scheduler

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of every request that made a token or finished."""
        return [out for _, out in self._step()]

    def _step(self) -> list[tuple[Request, RequestOutput]]:
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule(self._ticks % self.microbatches)
        self._ticks += 1
        self._count(plan)
        decode_rows = _bucket(max(len(w) for w in plan.decode), self.decode_buckets) if any(plan.decode) else 0
        if self.prefill is not None:  # disaggregated: the prefill side's chunks, this side's decodes, at once
            pplan = self.prefill.scheduler.schedule(0)
            self._count(pplan)
            prefill = self.prefill.launch(pplan.prefill)
            decode = self._launch("decode", plan.decode, decode_rows, 1)
            calls = [c for c in (prefill, decode) if c is not None and c[1] is not None]
        elif self._fed is not None:  # dispatch this step's calls, then read the last step's
            decode = self._launch_fed(plan.decode, decode_rows, 1, self.config.max_prefill_seqs)
            prefill = self._launch_fed(plan.prefill, self.config.max_prefill_seqs, self.config.chunk_size, 0)
            calls, self._inflight = self._inflight, [c for c in (decode, prefill) if c is not None]
        else:
            prefill = self._launch("prefill", plan.prefill, self.config.max_prefill_seqs, self.config.chunk_size)
            if self._multistep is not None and self._grow_for_steps(plan):
                decode = self._launch_steps(plan.decode, decode_rows)
            else:
                decode = self._launch("decode", plan.decode, decode_rows, 1)
            calls = [c for c in (prefill, decode) if c is not None and c[1] is not None]
        self.stats.prefill_calls += prefill is not None
        self.stats.decode_calls += decode is not None
        self.stats.mixed_steps += prefill is not None and decode is not None
        t1 = time.perf_counter()
        ids = [fetch(ids_B).tolist() for _, ids_B in calls]  # all rows, on every process (multi-host)
        now = t2 = time.perf_counter()
        for (per_group, _), ids_B in zip(calls, ids, strict=True):
            rows = len(ids_B) // len(per_group)  # per data group of the side that ran it
            for g, works in enumerate(per_group):
                for work, token in zip(works, ids_B[g * rows: g * rows + len(works)], strict=True):
                    out = self._commit(work, token, now) if isinstance(token, int) else self._commit_steps(
                        work, token, now)
                    if out is not None:
                        outputs.append((work.req, out))
        if self.prefill is not None:
            self._hand_over()
        self.stats.steps += 1
        self.stats.device_wait_s += t2 - t1
        self.stats.host_s += (t1 - t0) + (time.perf_counter() - t2)
        self._retire([req for req, out in outputs if out.finished])
        return outputs

    def _hand_over(self) -> None:
        """Disaggregated: move each finished prefill (oldest first) to this side while it has room (a slot and the
        pages of the sequence; first come, first served), its KV pages copied from the prefill pools."""
        ps, P = self.config.page_size, self.config.num_pages
        for req in self.prefill.scheduler.ready():
            spot = self.scheduler.find_place(req)
            if spot is None:
                return
            src = disagg.global_ids(req.pages[:pages_for(req.num_computed, ps)], req.group, P)
            self.prefill.scheduler.remove(req)  # its pages are free once the copy (dispatched below) has read them
            self.scheduler.place(req, *spot)
            dst = disagg.global_ids(req.pages[:len(src)], req.group, P)
            self.cache, moved = self.transfer(self.prefill.cache, self.cache, src, dst)
            req.kv_bytes_moved += moved
            self.stats.kv_transfers += 1
            self.stats.kv_transfer_bytes += moved

    def _count(self, plan) -> None:
        stats = self.stats
        stats.preemptions += len(plan.preempted)
        for work in plan.admitted:
            stats.prompt_tokens += len(work.req.tokens)
            stats.cached_prompt_tokens += work.start
        stats.prefill_tokens += sum(w.num for works in plan.prefill for w in works)

    def _launch(self, kind: str, per_group: list[list[Work]], rows: int, T: int):
        """Dispatch one call of T tokens per row with `per_group` entering (asynchronous).

        Returns None when no call was needed, else (the works whose tokens the call makes, per data
        group, or None; the future of their ids, [data * rows_of_call]). Without pipeline stages
        those are `per_group` itself; with stages, the microbatch leaving the last stage."""
        pipe = self._pipes and self._pipes[kind]
        if not any(per_group) and not (pipe and pipe.busy):
            return None
        t = time.perf_counter()
        with jax.set_mesh(self.steps.mesh):
            if pipe is None:
                packed = batch_lib.host_input(self._pack(per_group, rows, T), self._batch_sharding)
                ids_B, self.cache = self._fn(self.steps.params, self.cache, packed, T)
                leaving = per_group
            else:
                entering = None
                if any(per_group):
                    entering = Microbatch(per_group, self._pack(per_group, rows, T).reshape(self.groups, rows, -1))
                    for works in per_group:
                        for w in works:
                            w.req.in_flight = True
                else:
                    self.stats.bubbles += 1
                pad = self._padding(self.groups * pipe.capacity, T).reshape(self.groups, pipe.capacity, -1)
                mb, ids_B, self.cache = pipe.tick(self.steps.params, self.cache, entering, pad)
                leaving = mb.works if mb is not None else None
        self.stats.dispatch_s += time.perf_counter() - t
        return leaving, ids_B

    def _launch_fed(self, per_group: list[list[Work]], rows: int, T: int, offset: int):
        """Asynchronous scheduling: dispatch one call of T tokens per row (`fed_step`; its ids go to columns
        [offset, offset + rows) of the feed buffer), and advance its requests at once: their tokens computed, a
        placeholder for each token it samples (`Request.pending`, read at the next step). Returns None when
        nothing runs, else (per_group, the ids' future). Decode is dispatched before prefill: it reads the feed
        the last step's prefill call wrote."""
        if not any(per_group):
            return None
        t = time.perf_counter()
        with jax.set_mesh(self.steps.mesh):
            packed = batch_lib.host_input(self._pack(per_group, rows, T), self._batch_sharding)
            ids_B, self.cache, self._feed = self._fed(self.steps.params, self.cache, self._feed, packed, T, offset)
        for works in per_group:
            for i, w in enumerate(works):
                req = w.req
                req.num_computed += w.num
                if w.samples:
                    req.tokens.append(NONFINITE)  # a placeholder: never read by the host before the id replaces it
                    req.pending += 1
                    req.feed_slot = offset + i
        self.stats.dispatch_s += time.perf_counter() - t
        return per_group, ids_B

    def _grow_for_steps(self, plan) -> bool:
        """Whether this step's decode call may run `decode_steps` steps; if so, every decoding request now holds
        the pages of the tokens it may make in them.

        Only when the step only decodes and nothing could change the batch between those steps in a single-step
        engine: nobody admitted or waiting (an admission would join), nobody preempted, no prefill, no pipelined
        microbatches, and every data group has the pages (else single steps take them one by one, and preempt
        as the single-step engine would)."""
        if (self._pipes is not None or not any(plan.decode) or any(plan.prefill) or plan.preempted
                or plan.admitted or self.scheduler.waiting):
            return False
        k, ps = self.config.decode_steps, self.config.page_size
        ends = [[w.start + min(k, w.req.params.max_new_tokens - w.req.num_output) for w in works]
                for works in plan.decode]
        for g, works in enumerate(plan.decode):
            need = sum(max(0, pages_for(end, ps) - len(w.req.pages)) for w, end in zip(works, ends[g], strict=True))
            if need > self.allocator.num_free(g):
                return False
        for works, group_ends in zip(plan.decode, ends, strict=True):
            for w, end in zip(works, group_ends, strict=True):
                self.scheduler.grow(w.req, end)  # succeeds: counted above
        return True

    def _launch_steps(self, per_group: list[list[Work]], rows: int):
        """Dispatch one `decode_steps`-step decode call (asynchronous); like `_launch`, its ids are [B, K]."""
        t = time.perf_counter()
        k = self.config.decode_steps
        with jax.set_mesh(self.steps.mesh):
            packed = batch_lib.host_input(self._pack(per_group, rows, 1), self._batch_sharding)
            limits = batch_lib.host_input(batch_lib.decode_limits(per_group, rows, k), self._batch_sharding)
            ids_BK, self.cache = self._multistep(self.steps.params, self.cache, packed, limits, k)
        self.stats.dispatch_s += time.perf_counter() - t
        self.stats.multistep_calls += 1
        return per_group, ids_BK

    def _commit_steps(self, work: Work, tokens: list[int], now: float) -> RequestOutput | None:
        """Commit a decode work's tokens of consecutive steps in order, each as a single step would, up to the
        request's end (later tokens are discarded); one output with all the new tokens."""
        new, out = [], None
        for i, token in enumerate(tokens):
            out = self._commit(Work(work.req, work.start + i, 1, True, work.epoch), token, now)
            if out is None:
                break
            new += out.new_token_ids
            if out.finished:
                break
        return None if out is None else RequestOutput(out.request_id, new, out.finished, out.finish_reason, out.error)

    def _commit(self, work: Work, token: int, now: float) -> RequestOutput | None:
        req = work.req
        if req.finished or work.epoch != req.num_preemptions:  # aborted or preempted while in a pipeline
            return None
        req.in_flight = False
        owner = self._owner(req)
        if token == NONFINITE:
            return self._fail(req, f"non-finite logits at sequence position {work.start + work.num - 1} "
                                   f"(output position {req.num_output - req.pending})", now)
        index = work.start + work.num  # the position of the token it sampled
        if self._fed is None:
            req.num_computed += work.num
            if not work.samples:
                return None
            req.tokens.append(token)
        else:  # asynchronous: computed when dispatched, the token's placeholder is there
            if not work.samples:
                return None
            req.tokens[index] = token
            req.pending -= 1
            req.feed_slot = req.feed_slot if req.pending else -1
        req.token_times_s.append(now)
        owner.register(req, index)  # a finite token: every page it read holds good KV
        reason = None
        if token in req.params.stop_token_ids:
            reason = "stop"
        elif index + 1 - req.prompt_len >= req.params.max_new_tokens:
            reason = "length"
        if reason:
            owner.remove(req)
            self._finish(req, reason, now)
        return RequestOutput(req.request_id, [token], reason is not None, reason)

    def _fail(self, req: Request, message: str, now: float) -> RequestOutput:
        """Finish `req` with reason "error" (no token), freeing its pages."""
        self._owner(req).remove(req)
        self._finish(req, "error", now)
        req.error = message
        self.stats.nonfinite += 1
        return RequestOutput(req.request_id, [], True, "error", message)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        req.drop_pending()  # asynchronous scheduling: tokens sampled past the end (never delivered)
        req.finished, req.finish_reason, req.finished_s = True, reason, now

    def _retire(self, delivered: list[Request]) -> None:
        """Hand delivered finished requests to `on_finish`; keep the newest `max_finished_retained`."""
        self._delivered.extend(delivered)
        while len(self._delivered) > self.config.max_finished_retained:
            old = self._delivered.popleft()
            if self.requests.get(old.request_id) is old:  # not released, its id not reused
                del self.requests[old.request_id]
        if self.on_finish is not None:
            for req in delivered:
                self.on_finish(req)

    def _pack(self, per_group: list[list[Work]], rows: int, T: int) -> np.ndarray:
        """The packed [data * rows, W] batch of `per_group` works (`moejax.engine.batch.pack`)."""
        return batch_lib.pack(per_group, rows, T, self._padding(self.groups * rows, T))

    def _padding(self, B: int, T: int) -> np.ndarray:
        """The all-padding packed batch [B, W] of T tokens per row, built once per shape."""
        if (B, T) not in self._pad:
            self._pad[B, T] = batch_lib.padding(B, T, self.pages_per_seq)
        return self._pad[B, T]

    def compiled_step(self, kind: str, rows: int):
        """The compiled program of this engine's "prefill" or "decode" call with `rows` per data group
        (the pipelined tick with pipeline stages), from the jit cache; disaggregated, "prefill" is the prefill
        model's."""
        if kind == "prefill" and self.prefill is not None:
            return self.prefill.compiled_step(rows)
        T = self.config.chunk_size if kind == "prefill" else 1
        packed = np.array(self._padding(self.groups * rows, T))
        with jax.set_mesh(self.steps.mesh):
            if self._pipes is None:
                return self._fn.lower(self.steps.params, self.cache, packed, T).compile()
            return self._pipes[kind].lower(self.steps.params, self.cache, packed)

    @property
    def pipelined(self) -> bool:
        """True when a step is one pipeline tick (stages and microbatches > 1)."""
        return self._pipes is not None

    def occupancy(self) -> list[int]:
        """Running requests in each microbatch group."""
        return self.scheduler.occupancy()

    def warmup(self) -> None:
        """Compile the prefill shape and every decode bucket (all-padding batches: nothing is written)."""
        shapes = [("prefill", self.config.max_prefill_seqs, self.config.chunk_size)] if self.prefill is None else []
        shapes += [("decode", b, 1) for b in self.decode_buckets]
        if self.prefill is not None:
            self.prefill.warmup()
        with jax.set_mesh(self.steps.mesh):
            for b in self.decode_buckets if self._multistep is not None and self._pipes is None else ():
                packed = self._padding(self.groups * b, 1)
                limits = batch_lib.decode_limits([[]] * self.groups, b, 1)  # no row steps: nothing written
                ids_BK, self.cache = self._multistep(
                    self.steps.params, self.cache, batch_lib.host_input(packed, self._batch_sharding),
                    batch_lib.host_input(limits, self._batch_sharding), self.config.decode_steps)
                jax.block_until_ready(ids_BK)
            for kind, rows, T in shapes:
                packed = self._padding(self.groups * rows, T)
                if self._fed is not None:
                    ids_B, self.cache, self._feed = self._fed(
                        self.steps.params, self.cache, self._feed, batch_lib.host_input(packed, self._batch_sharding),
                        T, self.config.max_prefill_seqs if kind == "decode" else 0)
                    jax.block_until_ready(ids_B)
                elif self._pipes is None:
                    ids_B, self.cache = self._fn(self.steps.params, self.cache,
                                                 batch_lib.host_input(packed, self._batch_sharding), T)
                    jax.block_until_ready(ids_B)
                else:
                    self.cache = self._pipes[kind].warm(self.steps.params, self.cache, packed)

    # ---- drivers --------------------------------------------------------------------------------

    def stream(self, prompt_ids, params: SamplingParams | None = None,
               request_id: RequestId | None = None) -> Iterator[RequestOutput]:
        """Add a request now (bad input raises here) and return an iterator of its outputs as they
        come; iterating steps the engine (others progress too; their outputs are not returned: read
        them from `engine.requests` or `on_finish`).

        Only this request's outputs are yielded, even when its id is one reused from an earlier
        request whose abort output is still undelivered."""
        params = SamplingParams() if params is None else params
        req = self._add(self._check_request(prompt_ids, params), params, self._check_id(request_id))
        return self._outputs_of(req)

    def _outputs_of(self, req: Request) -> Iterator[RequestOutput]:
        while not req.finished or any(owner is req for owner, _ in self._pending):
            for owner, out in self._step():
                if owner is req:
                    yield out
                    if out.finished:
                        return

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Run prompts to completion (with whatever else is queued); returns the new token ids per prompt.

        All prompts are checked before any is queued: one bad prompt raises ValueError (naming its
        index) and none is accepted. A request that fails ("error") returns the tokens it made.
        """
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise ValueError(f"prompts must be a list of prompts (each a list of token ids), got {prompts!r:.80}")
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        plist = [SamplingParams() if sp is None else sp for sp in plist]
        checked = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist, strict=True)):
            try:
                checked.append(self._check_request(prompt, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e} (no prompt was queued)") from None
        reqs = [self._add(prompt, sp, None) for prompt, sp in zip(checked, plist, strict=True)]
        while not all(r.finished for r in reqs):
            self.step()
        return [r.output_ids for r in reqs]


def _powers_of_two(n: int) -> list[int]:
    out = [1]
    while out[-1] < n:
        out.append(out[-1] * 2)
    return out


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest decode bucket {buckets[-1]}")
