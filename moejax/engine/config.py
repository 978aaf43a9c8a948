"""The engine's knobs (`ServeConfig`), each checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.kv_cache import check_kv_cache_dtype

INT32_MAX = 2**31 - 1  # counts, lengths and page ids are packed into the int32 call batch


@dataclass(frozen=True)
class ServeConfig:
    """Engine knobs. Counts of requests and pages are totals over the mesh except where noted.

    Attributes:
      max_running: most requests running at once (a multiple of data groups x microbatches).
      page_size: tokens per KV page.
      num_pages: KV pages per data group (each group has its own pool).
      chunk_size: most prompt tokens one request prefills per step (the chunked-prefill knob); a
        step prefills up to max_prefill_seqs * chunk_size tokens per data group.
      max_prefill_seqs: prefill rows per step per data group.
      max_model_len: longest sequence (prompt + new tokens); None: the model's position limit.
      decode_buckets: decode batch sizes per data group; None: powers of two up to the first one >= the slots.
      seed: seeds the draws of requests that give no seed, in [0, 2**32).
      max_finished_retained: finished requests kept in `Engine.requests` after their last output
        was delivered (oldest dropped first); 0 drops each as soon as it is delivered.
      microbatches: microbatch groups the running requests are split into, taking turns at the
        pipeline's first stage; None: one per pipeline stage (1 without pipeline parallelism).
        max_running must be a multiple of data groups x microbatches.
      kv_cache_dtype: the KV pools' format: None (the model's `kv_cache_dtype`, by default the serving dtype),
        "fp8" (float8_e4m3fn) or "int8": 1 byte per value and a float32 scale per (token, kv head)
        (`moejax.kv_cache`).
      enable_prefix_caching: reuse the KV pages of a cached sequence prefix (full pages, per data group): a
        request is admitted with its longest cached prefix and prefills only the rest; a request's full pages are
        cached once a token it sampled is finite, and stay until the pool needs them (least recently used first).
        Outputs are the same as without it.
      async_scheduling: overlap the host with the device, as vLLM's asynchronous scheduling does: a step schedules
        and packs the next call while the device runs the previous one, whose sampled ids feed the new call on
        device (`moejax.engine.batch.fed_step`); the host reads a call's ids one step later, so `step()` returns
        the tokens of the call dispatched by the step before it. A request that stops is computed one step past its
        stop (that work dropped). Outputs are the same as without it. Not with pipelined microbatches (those
        overlap already) nor with decode_steps > 1.
      decode_steps: decode steps one call runs when a step only decodes and nothing can join or leave early (no
        prefill, nobody waiting, pages for every step available, no pipelined microbatches): a request then
        makes up to this many tokens per `step()` (fewer when it stops; stop conditions are checked on device).
        Outputs are the same as with 1 (the default: one token per step).

    Every field is checked on construction (ValueError naming the field, the value and the allowed
    range). Integers may be Python or numpy integers (stored as `int`), never booleans; every count
    is at most 2**31 - 1, as it is packed into int32. Checks that need the model (max_running a
    multiple of data groups x microbatches, buckets reaching the slots, max_model_len within the model's positions,
    the KV pools fitting in device memory) are made by `Engine`.
    """

    max_running: int = 8
    page_size: int = 16
    num_pages: int = 256
    chunk_size: int = 64
    max_prefill_seqs: int = 1
    max_model_len: int | None = None
    decode_buckets: tuple[int, ...] | None = None
    seed: int = 0
    max_finished_retained: int = 1024
    microbatches: int | None = None
    kv_cache_dtype: str | None = None
    enable_prefix_caching: bool = False
    decode_steps: int = 1
    async_scheduling: bool = False

    def __post_init__(self):
        for name, lo in (("max_running", 1), ("page_size", 1), ("num_pages", 1), ("chunk_size", 1),
                         ("max_prefill_seqs", 1), ("max_finished_retained", 0), ("decode_steps", 1)):
            self._set(name, _check_int(name, getattr(self, name), lo, INT32_MAX))
        if self.max_model_len is not None:
            self._set("max_model_len", _check_int("max_model_len", self.max_model_len, 1, INT32_MAX,
                                                  "; or None: the model's max_position_embeddings"))
        self._set("seed", _check_int("seed", self.seed, 0, 2**32 - 1))
        if self.microbatches is not None:
            self._set("microbatches", _check_int("microbatches", self.microbatches, 1, INT32_MAX,
                                                 "; or None: one per pipeline stage"))
        if self.decode_buckets is not None:
            self._set("decode_buckets", _check_buckets(self.decode_buckets))
        check_kv_cache_dtype(self.kv_cache_dtype, "ServeConfig.kv_cache_dtype")
        for name in ("enable_prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ServeConfig.{name} must be a bool (True or False), got {getattr(self, name)!r}")
            self._set(name, bool(getattr(self, name)))
        if self.async_scheduling and self.decode_steps > 1:
            raise ValueError(f"ServeConfig.async_scheduling and decode_steps > 1 ({self.decode_steps}) do not combine: "
                             f"pick one (both hide the host's per-step work)")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # frozen: normalise in place during construction


def _check_int(name: str, value, lo: int, hi: int, note: str = "") -> int:
    """`value` as an int when it is an integer (Python or numpy, not bool) in [lo, hi]; else ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        what = "be an integer" + " (booleans are not numbers)" * isinstance(value, (bool, np.bool_))
    elif not lo <= value <= hi:
        what = f"be at least {lo}" if value < lo else f"be at most {hi}"
    else:
        return int(value)
    raise ValueError(f"ServeConfig.{name} must {what}, got {value!r}; allowed: integers in [{lo}, {hi}]{note}")


def _check_buckets(buckets) -> tuple[int, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, (tuple, list)) or not buckets:
        raise ValueError(f"ServeConfig.decode_buckets must be a non-empty tuple of batch sizes (e.g. (1, 2, 4, 8)) "
                         f"or None, got {buckets!r}")
    return tuple(_check_int(f"decode_buckets[{i}]", b, 1, INT32_MAX) for i, b in enumerate(buckets))
