"""Serve a `Workload` through an `Engine` and measure it: per-request TTFT, TPOT, latency, and run throughput.

`Collector` is the engine's `on_finish` hook (the engine keeps only its newest finished records, so
metrics are taken as each request is delivered). `run_workload` sends the requests (closed loop or
Poisson arrivals, see `moejax.bench.workload`), steps the engine until all are done and returns a
`RunResult`; `serve` runs the warm-up requests first and measures the rest.

Definitions (per request; the run's figures are over the measured requests only):

- TTFT: first token time - arrival time. In a closed loop the arrival is when the request is sent;
  with Poisson arrivals it is the scheduled arrival, so time spent waiting for the engine to finish
  its current step counts, as it would for a client.
- TPOT: (last token time - first token time) / (tokens - 1), for requests with at least 2 tokens.
- end-to-end latency: last token time - arrival time.
- tokens/s per user: 1 / TPOT of each request (p50 / p90 / p99 over requests); the run's
  `tokens_per_s_per_user` is 1 / mean TPOT (the planner's definition, `moejax.planner.calibrate`).
- tokens/s: output tokens / duration, duration = first arrival to last token; per device: / devices.
- prefix cache (the engine's `EngineStats` over the measured requests): prompt tokens admitted (a
  re-admission after a preemption counts its sequence again), of those cached (served from the prefix
  cache), prefill tokens computed (scheduled in prefill calls), and the hit rate, cached / prompt tokens
  (0 without prefix caching: the planner's `Workload.prefix_hit_rate`).
- disaggregated serving (`Engine(..., prefill_model=...)`): the KV moves from the prefill side over the measured
  requests (`EngineStats.kv_transfers`, `kv_transfer_bytes`; each record's `kv_bytes_moved`); devices count both
  sides.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moejax.bench.workload import RequestSpec, Workload
from moejax.engine.scheduler import TokenTimes

PERCENTILES = (50, 90, 99)


class Collector:
    """`Engine(on_finish=collector)`: keeps every finished request delivered since the last `clear()`."""

    def __init__(self):
        self.finished: dict = {}

    def __call__(self, req) -> None:
        self.finished[req.request_id] = req

    def clear(self) -> None:
        self.finished = {}


@dataclass
class RequestRecord(TokenTimes):
    """What one request did, in seconds on `time.perf_counter`'s clock."""

    input_len: int
    max_new_tokens: int
    arrival_s: float
    token_times_s: list[float]
    output_ids: list[int]
    finish_reason: str | None
    kv_bytes_moved: int = 0  # disaggregated: the bytes of KV pages moved to the decode side for it

    @property
    def e2e_s(self) -> float | None:
        return self.token_times_s[-1] - self.arrival_s if self.token_times_s else None


@dataclass
class RunResult:
    """The measured requests of one run (in the workload's order) and the engine's step counts over it."""

    records: list[RequestRecord]
    devices: int
    steps: int = 0
    preemptions: int = 0
    mixed_steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    prefill_tokens: int = 0
    kv_transfers: int = 0
    kv_transfer_bytes: int = 0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        ends = [r.token_times_s[-1] for r in self.records if r.token_times_s]
        return max(ends) - min(r.arrival_s for r in self.records) if ends else 0.0

    @property
    def output_tokens(self) -> int:
        return sum(len(r.output_ids) for r in self.records)

    @property
    def input_tokens(self) -> int:
        return sum(r.input_len for r in self.records)

    @property
    def prefix_hit_rate(self) -> float:
        """Cached / admitted prompt tokens (0 when none was admitted)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def outputs(self) -> list[list[int]]:
        return [r.output_ids for r in self.records]

    @property
    def output_digest(self) -> str:
        """sha256 (first 16 hex digits) of every request's output ids, in order: equal digests, equal tokens."""
        return hashlib.sha256(json.dumps(self.outputs).encode()).hexdigest()[:16]

    def metrics(self) -> dict:
        """The run's figures as a flat dict (seconds, tokens/s); keys of the sweep's JSON lines."""
        duration = self.duration_s
        ttft = [r.ttft_s for r in self.records if r.ttft_s is not None]
        tpot = [r.tpot_s for r in self.records if r.tpot_s is not None]
        e2e = [r.e2e_s for r in self.records if r.e2e_s is not None]
        tps = self.output_tokens / duration if duration > 0 else 0.0
        mean_tpot = float(np.mean(tpot)) if tpot else None
        out = {
            "num_requests": len(self.records), "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "duration_s": duration,
            "requests_per_s": len(self.records) / duration if duration > 0 else 0.0,
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.devices,
            "ttft_s": float(np.mean(ttft)) if ttft else None, "tpot_s": mean_tpot,
            "e2e_s": float(np.mean(e2e)) if e2e else None,
            "tokens_per_s_per_user": 1.0 / mean_tpot if mean_tpot else None,
            "errors": sum(r.finish_reason == "error" for r in self.records),
            "steps": self.steps, "preemptions": self.preemptions, "mixed_steps": self.mixed_steps,
            "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
            "prefill_tokens": self.prefill_tokens, "prefix_hit_rate": self.prefix_hit_rate,
        }
        user = [1.0 / t for t in tpot if t > 0]
        for name, values in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e), ("tokens_per_s_per_user", user)):
            for q in PERCENTILES:
                out[f"{name}_p{q}"] = float(np.percentile(values, q)) if values else None
        return out


def run_workload(engine, collector: Collector, specs: list[RequestSpec], in_flight: int | None,
                 timed_arrivals: bool, clock: Callable[[], float] = time.perf_counter) -> RunResult:
    """Send `specs` through `engine` and step it until every request has finished.

    Args:
        engine: an `Engine` built with `on_finish=collector`, idle.
        collector: its `on_finish` hook (cleared here).
        specs: requests in sending order.
        in_flight: most requests sent but not finished (None: no bound).
        timed_arrivals: send each request at its `arrival_s` after the start (Poisson); otherwise as
            soon as `in_flight` allows (closed loop).
        clock: the time source (`time.perf_counter`, the engine's).

    Returns:
        A RunResult over `specs`, in their order.
    """
    from moejax.engine.sampling import SamplingParams

    if engine.has_unfinished():
        raise ValueError("the engine must be idle before a run (it still has unfinished requests)")
    collector.clear()
    counted = ("steps", "preemptions", "mixed_steps", "prompt_tokens", "cached_prompt_tokens", "prefill_tokens",
               "kv_transfers", "kv_transfer_bytes")
    stats0 = {name: getattr(engine.stats, name) for name in counted}
    start = clock()
    arrivals: dict = {}
    sent = 0
    while sent < len(specs) or len(collector.finished) < len(specs):
        now = clock()
        while sent < len(specs) and (in_flight is None or sent - len(collector.finished) < in_flight):
            spec = specs[sent]
            due = start + spec.arrival_s if timed_arrivals else now
            if due > now:
                break
            rid = engine.add_request(list(spec.prompt), SamplingParams(max_new_tokens=spec.max_new_tokens))
            arrivals[rid] = (sent, due)
            sent += 1
        if engine.has_unfinished():
            engine.step()
        elif sent < len(specs):  # idle until the next arrival
            time.sleep(max(0.0, start + specs[sent].arrival_s - clock()))
        elif len(collector.finished) < len(specs):
            raise RuntimeError(f"the engine is idle but only {len(collector.finished)} of {len(specs)} requests "
                               f"were delivered to on_finish: was the engine built with on_finish=collector?")
    records: list[RequestRecord | None] = [None] * len(specs)
    for rid, req in collector.finished.items():
        i, arrival = arrivals[rid]
        records[i] = RequestRecord(len(specs[i].prompt), specs[i].max_new_tokens, arrival,
                                   list(req.token_times_s), list(req.output_ids), req.finish_reason,
                                   req.kv_bytes_moved)
    deltas = {name: getattr(engine.stats, name) - before for name, before in stats0.items()}
    return RunResult(records, devices=engine_devices(engine), wall_s=clock() - start, **deltas)


def engine_devices(engine) -> int:
    """Devices the engine serves on: its model's, and a disaggregated engine's prefill model's."""
    side = getattr(engine, "prefill", None)
    return engine.model.layout.size + (side.model.layout.size if side is not None else 0)


def serve(engine, collector: Collector, workload: Workload) -> tuple[RunResult, float]:
    """Warm-up requests (closed loop at `max_running`), then the measured ones; returns (result, warm-up seconds)."""
    vocab, max_running = engine.model.cfg.vocab_size, engine.config.max_running
    t = time.perf_counter()
    warm = workload.requests(vocab, warmup=workload.warmup_count(max_running))
    if warm:
        run_workload(engine, collector, warm, max_running, timed_arrivals=False)
    warmup_s = time.perf_counter() - t
    result = run_workload(engine, collector, workload.requests(vocab), workload.in_flight(max_running),
                          timed_arrivals=workload.request_rate is not None)
    return result, warmup_s


def format_result(m: dict, title: str = "Serving Benchmark Result", header: list[tuple[str, object]] = ()) -> str:
    """A summary table in the style of `vllm bench serve` from `RunResult.metrics()` (plus any header rows)."""

    def ms(v):
        return "n/a" if v is None else f"{v * 1e3:.2f}"

    def num(v, fmt=".2f"):
        return "n/a" if v is None else format(v, fmt)

    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]
    row = lambda k, v: lines.append(f"{k + ':':<40}{v!s:>10}")  # noqa: E731
    for k, v in header:
        row(k, v)
    row("Successful requests", m["num_requests"] - m["errors"])
    row("Failed requests", m["errors"])
    row("Benchmark duration (s)", num(m["duration_s"]))
    row("Total input tokens", m["input_tokens"])
    row("Total generated tokens", m["output_tokens"])
    row("Request throughput (req/s)", num(m["requests_per_s"]))
    row("Output token throughput (tok/s)", num(m["tokens_per_s"]))
    row("Output tokens/s per device", num(m["tokens_per_s_per_device"]))
    for name, key in (("Time to First Token", "ttft_s"), ("Time per Output Token (excl. 1st token)", "tpot_s"),
                      ("End-to-end Latency", "e2e_s")):
        short = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2EL"}[key]
        lines.append(f"{name:-^{width}}")
        row(f"Mean {short} (ms)", ms(m[key]))
        for q in PERCENTILES:
            row(f"P{q} {short} (ms)", ms(m[f"{key}_p{q}"]))
    lines.append(f"{'Tokens/s per User (1 / TPOT)':-^{width}}")
    row("1 / mean TPOT (tok/s)", num(m["tokens_per_s_per_user"]))
    for q in PERCENTILES:
        row(f"P{q} (tok/s)", num(m[f"tokens_per_s_per_user_p{q}"]))
    lines.append(f"{'Prefix Cache':-^{width}}")
    row("Prompt tokens admitted", m["prompt_tokens"])
    row("Cached prompt tokens", m["cached_prompt_tokens"])
    row("Prefill tokens computed", m["prefill_tokens"])
    row("Prefix cache hit rate (%)", num(100 * m["prefix_hit_rate"]))
    lines.append("=" * width)
    return "\n".join(lines)
