"""The serving engine: requests in, a jitted prefill-chunk step and a jitted decode step per engine step.

Each `Engine.step()` asks the scheduler for a plan, builds numpy batches, dispatches (at most) one
prefill-chunk call [data * max_prefill_seqs, chunk_size] and one decode call [data * bucket, 1]
of the same compiled step function (model step + on-device sampler, KV pools donated), then reads
back only the sampled ids. Shapes are static: the prefill shape is fixed by the config, the decode
batch per data group is rounded up to one of `decode_buckets`; `warmup()` compiles them all.

Batch rows are split evenly over the `data` groups (row b belongs to group b // (B / data)), and
each row's page table holds that group's local page ids (see `moejax.kv_cache`).

Host work per call is kept small (it is paid every decode step, see `moejax.bench.decode`): a
call's whole batch is ONE int32 array [B, W] (layout `_packed_layout`: tokens, page table,
start, count, sample counter, then the per-request sampling parameters, floats and the uint32
seed as their int32 bits), handed to the jitted function as numpy and placed by its
`in_shardings` (rows split over `data`) in one transfer; positions, the logits index and the
typed sampling arrays are unpacked on device. Each request keeps its page-table row
(`Request.page_table`, kept by the scheduler) and its packed sampling fields
(`Request.sampling_row`), so building a batch is a few vectorised copies.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from moejax import steps as steps_lib
from moejax.engine.sampling import SamplingParams, sample
from moejax.engine.scheduler import Request, Scheduler, Work
from moejax.kv_cache import PageAllocator, pages_for

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class ServeConfig:
    """Engine knobs. Counts of requests and pages are totals over the mesh except where noted.

    Attributes:
      max_running: most requests running at once (a multiple of the `data` size).
      page_size: tokens per KV page.
      num_pages: KV pages per data group (each group has its own pool).
      chunk_size: most prompt tokens one request prefills per step (the chunked-prefill knob); a
        step prefills up to max_prefill_seqs * chunk_size tokens per data group.
      max_prefill_seqs: prefill rows per step per data group.
      max_model_len: longest sequence (prompt + new tokens); None: the model's position limit.
      decode_buckets: decode batch sizes per data group; None: powers of two up to the slots.
      seed: seeds the draws of requests that give no seed.
    """

    max_running: int = 8
    page_size: int = 16
    num_pages: int = 256
    chunk_size: int = 64
    max_prefill_seqs: int = 1
    max_model_len: int | None = None
    decode_buckets: tuple[int, ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether (and why) it finished."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


@dataclass
class EngineStats:
    steps: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    preemptions: int = 0
    mixed_steps: int = 0  # steps that ran a prefill chunk and a decode together
    host_s: float = 0.0  # wall time of step() outside waiting for device results
    dispatch_s: float = 0.0  # the part of host_s spent inside the compiled calls until they return
    device_wait_s: float = 0.0


_STEP_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Packed batch columns after the T tokens and the P page-table entries (one int32 row per request).
_START, _NUM, _COUNTER, _TOP_K, _SEED, _TEMPERATURE, _TOP_P = range(7)
_META = 7  # columns from _START on; _TOP_K.. are a request's `sampling_row`


def _packed_layout(T: int, P: int) -> tuple[slice, slice, int]:
    """Column slices (tokens, page table) and the first meta column of a [B, T + P + _META] batch."""
    return slice(0, T), slice(T, T + P), T + P


def _sampling_row(params: SamplingParams, seed: int) -> np.ndarray:
    """A request's packed sampling columns: top_k, seed (uint32 bits), temperature and top_p (float32 bits)."""
    row = np.zeros(_META - _TOP_K, np.int32)
    row[_TOP_K - _TOP_K] = params.top_k
    row[_SEED - _TOP_K] = np.uint32(seed).view(np.int32)
    row[_TEMPERATURE - _TOP_K] = np.float32(params.temperature).view(np.int32)
    row[_TOP_P - _TOP_K] = np.float32(params.top_p).view(np.int32)
    return row


def _sampled_step(steps: steps_lib.Steps):
    """The model step followed by the sampler, jitted once per `Steps` (engines share compilations).

    The jitted function is `fn(params, cache, packed_BW, num_tokens)`: `packed_BW` is the host
    int32 batch (see `_packed_layout`), placed rows-over-`data` by `in_shardings`; `num_tokens` (T,
    static) splits its columns. Padding rows have count 0: positions -1 (no KV write, no attention).
    """
    if steps not in _STEP_FNS:
        batch = jax.NamedSharding(steps.mesh, steps_lib.BATCH)

        def fn(params, cache, packed_BW, num_tokens):
            T = num_tokens
            packed_BW = jax.sharding.reshard(packed_BW, batch)  # types the rows as split (already placed so)
            tok, table, m = _packed_layout(T, packed_BW.shape[1] - T - _META)
            col = lambda c: packed_BW[:, m + c]  # noqa: E731
            as_f32 = lambda c: jax.lax.bitcast_convert_type(col(c), jnp.float32)  # noqa: E731
            start_B, num_B = col(_START), col(_NUM)
            t_T = jnp.arange(T, dtype=jnp.int32)
            pos_BT = jnp.where(t_T[None] < num_B[:, None], start_B[:, None] + t_T[None], -1)
            index_B = jnp.maximum(num_B - 1, 0)
            logits_BV, _, cache = steps.step(params, cache, packed_BW[:, tok], pos_BT, packed_BW[:, table], index_B)
            seed_B = jax.lax.bitcast_convert_type(col(_SEED), jnp.uint32)
            ids_B = sample(logits_BV, as_f32(_TEMPERATURE), col(_TOP_K), as_f32(_TOP_P), seed_B, col(_COUNTER))
            return ids_B, cache

        _STEP_FNS[steps] = jax.jit(fn, in_shardings=(None, None, batch), donate_argnums=(1,),
                                   static_argnums=(3,))
    return _STEP_FNS[steps]


class Engine:
    """In-flight batching over a paged KV cache for one placed `moejax.Model`.

    Args:
      model: a `moejax.Model` (weights on its mesh).
      config: `ServeConfig`.
    """

    def __init__(self, model, config: ServeConfig | None = None):
        config = config or ServeConfig()
        self.model, self.config = model, config
        self.data = model.layout.data
        self.max_len = config.max_model_len or model.cfg.max_position_embeddings
        self._check_config(config)
        self.slots = config.max_running // self.data
        self.decode_buckets = tuple(sorted(config.decode_buckets or _powers_of_two(self.slots)))
        self.pages_per_seq = pages_for(self.max_len, config.page_size)
        self.allocator = PageAllocator(self.data, config.num_pages)
        self.scheduler = Scheduler(self.allocator, config.page_size, self.slots, config.chunk_size,
                                   config.max_prefill_seqs)
        self.cache = model.steps.new_cache(config.num_pages * self.data, config.page_size, model.dtype)
        self._fn = _sampled_step(model.steps)
        self.requests: dict[str, Request] = {}  # every request not yet released, finished ones included
        self._pending: list[RequestOutput] = []  # abort outputs, delivered by the next step()
        self._order = itertools.count()
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self._pad: dict[tuple[int, int], np.ndarray] = {}
        self.stats = EngineStats()

    def _check_config(self, c: ServeConfig) -> None:
        for name in ("max_running", "page_size", "num_pages", "chunk_size", "max_prefill_seqs"):
            if getattr(c, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be at least 1, got {getattr(c, name)}")
        if c.max_running % self.data:
            raise ValueError(f"ServeConfig.max_running ({c.max_running}) must be a multiple of the data size "
                             f"({self.data})")
        if self.max_len > self.model.cfg.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_len}) exceeds the model's max_position_embeddings "
                             f"({self.model.cfg.max_position_embeddings})")
        if c.decode_buckets and max(c.decode_buckets) < c.max_running // self.data:
            raise ValueError(f"decode_buckets {c.decode_buckets} must reach the slots per data group "
                             f"({c.max_running // self.data})")

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError (engine state untouched) on bad input."""
        params = params or SamplingParams()
        prompt = self._check_request(prompt_ids, params, request_id)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        seed = int(params.seed) if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(rid, next(self._order), len(prompt), prompt, params, seed, arrival_s=time.perf_counter(),
                      page_table=np.zeros(self.pages_per_seq, np.int32), sampling_row=_sampling_row(params, seed))
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def _check_request(self, prompt_ids, params: SamplingParams, request_id) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = np.asarray(prompt_ids)
        if ids.size == 0:
            raise ValueError("prompt cannot be empty: pass at least one token id")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt must be a 1-D sequence of integer token ids, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        vocab = self.model.cfg.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"Token id {int(bad[0])} is out of vocabulary (vocab_size={vocab})")
        params.check(vocab)
        total = ids.size + params.max_new_tokens
        if total > self.max_len:
            raise ValueError(f"prompt of {ids.size} tokens + max_new_tokens {params.max_new_tokens} = {total} "
                             f"exceeds the context limit max_model_len={self.max_len}")
        need, have = pages_for(total, self.config.page_size), self.config.num_pages
        if need > have:
            raise ValueError(f"request needs {need} KV pages ({total} tokens at page_size {self.config.page_size}) "
                             f"but the whole pool of a data group has {have} pages")
        if request_id is not None and str(request_id) in self.requests \
                and not self.requests[str(request_id)].finished:
            raise ValueError(f"request id {request_id!r} is already running")
        return ids.astype(int).tolist()

    def abort(self, request_id: str) -> None:
        """Stop a request now: its pages are freed; the next step() reports finish reason "abort"."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        self.scheduler.remove(req)
        self._finish(req, "abort", time.perf_counter())
        self._pending.append(RequestOutput(req.request_id, [], True, "abort"))

    def release(self, request_id: str) -> Request | None:
        """Forget a finished request (its record and metrics); returns it."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            return self.requests.pop(request_id)
        return None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of every request that made a token or finished."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        calls = []
        if any(plan.prefill):
            calls.append((plan.prefill, self._dispatch(plan.prefill, self.config.max_prefill_seqs,
                                                       self.config.chunk_size)))
            self.stats.prefill_calls += 1
        if any(plan.decode):
            rows = _bucket(max(len(w) for w in plan.decode), self.decode_buckets)
            calls.append((plan.decode, self._dispatch(plan.decode, rows, 1)))
            self.stats.decode_calls += 1
        self.stats.mixed_steps += len(calls) == 2
        t1 = time.perf_counter()
        ids = [np.asarray(ids_B).tolist() for _, ids_B in calls]
        now = t2 = time.perf_counter()
        for (per_group, _), ids_B in zip(calls, ids, strict=True):
            rows = len(ids_B) // self.data
            for g, works in enumerate(per_group):
                for work, token in zip(works, ids_B[g * rows: g * rows + len(works)], strict=True):
                    out = self._commit(work, token, now)
                    if out is not None:
                        outputs.append(out)
        self.stats.steps += 1
        self.stats.device_wait_s += t2 - t1
        self.stats.host_s += (t1 - t0) + (time.perf_counter() - t2)
        return outputs

    def _commit(self, work: Work, token: int, now: float) -> RequestOutput | None:
        req = work.req
        req.num_computed += work.num
        if not work.samples:
            return None
        req.tokens.append(token)
        req.token_times_s.append(now)
        reason = None
        if token in req.params.stop_token_ids:
            reason = "stop"
        elif req.num_output >= req.params.max_new_tokens:
            reason = "length"
        if reason:
            self.scheduler.remove(req)
            self._finish(req, reason, now)
        return RequestOutput(req.request_id, [token], reason is not None, reason)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        req.finished, req.finish_reason, req.finished_s = True, reason, now

    def _dispatch(self, per_group: list[list[Work]], rows: int, T: int):
        """Pack the [data * rows, T] batch of `per_group` works (one int32 array) and dispatch the step."""
        B = self.data * rows
        tok, table, m = _packed_layout(T, self.pages_per_seq)
        packed = self._padding(B, T).copy()  # fresh each call: the transfer may alias host memory
        works = [w for ws in per_group for w in ws]
        if works:
            r = np.array([g * rows + i for g, ws in enumerate(per_group) for i in range(len(ws))])
            n = len(works)  # (concatenate + reshape: a third of np.stack's cost on a few dozen small rows)
            packed[r, table] = np.concatenate([w.req.page_table for w in works]).reshape(n, -1)
            packed[r, m + _TOP_K:] = np.concatenate([w.req.sampling_row for w in works]).reshape(n, -1)
            packed[r, m:m + _TOP_K] = [(w.start, w.num, len(w.req.tokens) - w.req.prompt_len) for w in works]
            if T == 1:
                packed[r, 0] = [w.req.tokens[w.start] for w in works]
            else:
                for i, w in zip(r.tolist(), works, strict=True):
                    packed[i, : w.num] = w.req.tokens[w.start: w.start + w.num]
        return self._call(packed, T)

    def _padding(self, B: int, T: int) -> np.ndarray:
        """The all-padding packed batch [B, T + P + _META] (count 0, greedy, top_p 1), built once per shape."""
        key = (B, T)
        if key not in self._pad:
            _, _, m = _packed_layout(T, self.pages_per_seq)
            pad = np.zeros((B, m + _META), np.int32)
            pad[:, m + _TOP_K:] = _sampling_row(SamplingParams(), 0)
            self._pad[key] = pad
        return self._pad[key]

    def _call(self, packed_BW: np.ndarray, T: int):
        """Transfer the packed batch and launch the compiled step (asynchronous: returns the ids' future).

        The launch itself is not free on XLA:CPU (a few hundred microseconds of this thread's time
        for the bench model, more when the device threads already compete for the cores); it is
        counted in `stats.dispatch_s`.
        """
        t = time.perf_counter()
        with jax.set_mesh(self.model.mesh):
            ids_B, self.cache = self._fn(self.model.params, self.cache, packed_BW, T)
        self.stats.dispatch_s += time.perf_counter() - t
        return ids_B

    def warmup(self) -> None:
        """Compile the prefill shape and every decode bucket (all-padding batches: nothing is written)."""
        shapes = [(self.config.max_prefill_seqs, self.config.chunk_size)] + [(b, 1) for b in self.decode_buckets]
        for rows, T in shapes:
            np.asarray(self._dispatch([[] for _ in range(self.data)], rows, T))

    # ---- drivers --------------------------------------------------------------------------------

    def stream(self, prompt_ids, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and yield its outputs as they come, stepping the engine (others progress too;
        their tokens stay in `engine.requests`)."""
        rid = self.add_request(prompt_ids, params, request_id)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Run prompts to completion (with whatever else is queued); returns the new token ids per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while not all(self.requests[i].finished for i in ids):
            self.step()
        return [self.requests[i].output_ids for i in ids]


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
