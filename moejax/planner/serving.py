"""Serving metrics under in-flight batching with chunked prefill: TTFT, TPOT, tokens/s/device, tokens/s/user.

Steady-state fluid model of one attention group (a set of requests with its own scheduler; a replica has one,
or `expert` of them when attention is data-parallel over the expert axis):

- `requests` slots are always full (closed loop: a finishing request is replaced at once). Each request has
  `isl` prompt tokens and `osl` output tokens; the first output token comes out of its last prefill chunk,
  the other osl - 1 out of decode steps.
- Every round (one step for every request in the group) carries one decode token per decoding request, and
  some rounds carry prefill: whole chunks of min(chunk, isl) tokens, at most `chunk` tokens per round. A
  request needs at least ceil(isl / chunk) rounds of prefill; when prefill demand exceeds the chunk budget,
  requests queue and the prefill phase stretches to n = requests * isl / chunk - (osl - 1) rounds. So a
  request cycles through osl - 1 + n rounds and, per round, the group processes requests * (osl - 1) / cycle
  decode tokens and requests * isl / cycle prefill tokens. Those prefill tokens ride in a fraction
  f = min(1, prefill chunks per round) of the rounds ("mixed" rounds); the others are decode-only. Costing the
  two kinds apart matters because weight traffic is concave in the tokens of a round (an expert is read once
  however many tokens hit it). With several attention groups (`ep_attention='data'`), their mixed rounds are
  assumed synchronised, and a chunk or a request is whole on one group (the busiest group sets the pace).
- TPOT = f x mixed round + (1 - f) x decode round (the mean time per output token of a decoding request);
  TTFT = n x mixed round (arrival to first token, queueing included). tokens/s/user = 1 / TPOT.
  tokens/s/device = output tokens per second of the replica / devices per replica.
- Pipeline: a round is `m` microbatches (`Options.microbatches`, default one per stage). It lasts
  max(m x slowest stage, sum of stages + (PP - 1) sends): with fewer microbatches than stages the pipeline
  idles (the bubble); with at least as many, stages stay busy and sends hide behind other microbatches.
  Every microbatch re-reads its stage's weights, so microbatching costs memory traffic at small batch.
- Data parallelism: replicas are independent; `batch_size` reported is requests over all replicas, and the
  latency of a request does not depend on how many replicas there are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.cost import Load, StageCost, send_time, stage_cost
from moejax.planner.hardware import Hardware
from moejax.planner.memory import memory_fit, microbatches, stages
from moejax.planner.workload import Options, Workload


@dataclass(frozen=True)
class SteadyState:
    """Per-round averages of one attention group in steady state."""

    decode: float  # decode tokens per round
    prefill: float  # prefill tokens per round
    completions: float  # requests finishing their prefill (= first tokens) per round
    prefill_rounds: float  # rounds from arrival to first token


def steady_state(requests: float, chunk: int, isl: int, osl: int) -> SteadyState:
    """Fluid steady state of `requests` concurrent requests sharing a prefill budget of `chunk` tokens per round."""
    if requests <= 0 or chunk < 1:
        raise ValueError(f"requests must be > 0 and chunk >= 1, got {requests}, {chunk}")
    decode_rounds = osl - 1
    prefill_rounds = max(math.ceil(isl / chunk), requests * isl / chunk - decode_rounds)
    cycle = decode_rounds + prefill_rounds
    return SteadyState(decode=requests * decode_rounds / cycle, prefill=requests * isl / cycle,
                       completions=requests / cycle, prefill_rounds=prefill_rounds)


@dataclass(frozen=True)
class Prediction:
    """Predicted serving metrics of one configuration (layout, batch, chunk). Times in seconds."""

    layout: str
    chunk_size: int
    batch_size: int  # concurrent requests over all data-parallel replicas
    feasible: bool
    reason: str
    mem_per_device_bytes: float
    ttft_s: float
    tpot_s: float
    tokens_per_s_per_device: float
    tokens_per_s_per_user: float
    microbatches: int
    bubble: float  # fraction of a round the busiest stage idles
    t_compute_s: float  # per round on the busiest stage (all microbatches)
    t_memory_s: float
    t_comm_s: float
    bound: str  # 'compute' | 'memory' | 'comm' | 'overhead': the largest term on the busiest stage

    def as_dict(self) -> dict:
        return asdict(self)


def _busiest(total: float, groups: int) -> float:
    """Share of `total` units (requests, chunks) on the busiest of `groups` groups: whole units go to one group."""
    return max(total / groups, min(total, 1.0))


def round_loads(cfg: ModelConfig, layout: Layout, workload: Workload, options: Options,
                batch: int, chunk: int) -> tuple[SteadyState, float, Load, Load, int]:
    """The two kinds of rounds of one replica, as microbatch loads.

    Returns:
        (steady state of one attention group, fraction of rounds that carry prefill, load of one microbatch of
        a round with prefill, load of one microbatch of a decode-only round, microbatches per round).
    """
    groups = options.attention_groups(layout.expert)
    isl, osl = workload.isl, workload.osl
    state = steady_state(batch / groups, chunk, isl, osl)
    m = microbatches(layout, batch, options)
    piece = min(chunk, isl)
    chunks_per_round = groups * state.prefill / piece  # over the replica, averaged over all rounds
    mixed_fraction = min(1.0, chunks_per_round)
    chunks = chunks_per_round / mixed_fraction  # in a mixed round
    decode = groups * state.decode
    group_decode = _busiest(decode, groups)
    group_chunks = _busiest(chunks, groups)
    finishing = groups * state.completions / mixed_fraction * group_chunks / chunks  # busiest group's first tokens
    context = isl + osl / 2.0
    decode_load = Load(decode=decode / m, group_decode=group_decode / m, logits=group_decode / m,
                       decode_context=context)
    mixed_load = Load(
        decode=decode / m, prefill=chunks * piece / m,
        group_decode=group_decode / m, group_prefill=group_chunks * piece / m,
        logits=(group_decode + finishing) / m, chunks=group_chunks / m,
        decode_context=context, prefill_context=(isl + 1) / 2.0, prefix=(isl - piece) / 2.0,
    )
    return state, mixed_fraction, mixed_load, decode_load, m


def round_time(cfg: ModelConfig, layout: Layout, hw: Hardware, workload: Workload, options: Options,
               load: Load, m: int) -> tuple[float, StageCost]:
    """(seconds of one pipeline round of `m` microbatches of `load`, cost of the slowest stage per microbatch)."""
    costs: list[StageCost] = []
    cache: dict[tuple, StageCost] = {}
    for s in stages(cfg, layout):
        key = (s.moe_layers, s.dense_layers, s.first, s.last)
        if key not in cache:
            cache[key] = stage_cost(cfg, layout, hw, workload, options, s, load)
        costs.append(cache[key])
    slowest = max(costs, key=lambda c: c.time)
    pipeline = sum(c.time for c in costs) + (layout.stage - 1) * send_time(cfg, layout, hw, workload, load)
    return max(m * slowest.time, pipeline), slowest


def predict(cfg: ModelConfig, layout: Layout | str, hw: Hardware, workload: Workload, options: Options | None = None,
            batch: int = 1, chunk: int = 512) -> Prediction:
    """Predict TTFT, TPOT and throughput of one configuration.

    Args:
        cfg: the model.
        layout: parallel layout (a `Layout` or a string such as 'TP2EP16PP2').
        hw: hardware, with its efficiency factors.
        workload: request shape and formats.
        options: modelling options (defaults: `Options()`).
        batch: concurrent requests per data-parallel replica.
        chunk: prefill tokens per round per attention group.

    Returns:
        A `Prediction`; `feasible` is False (with `reason`) when the heaviest device runs out of memory.
    """
    layout, options = Layout.parse(layout), options or Options()
    if cfg.num_experts % layout.expert:
        raise ValueError(f"expert ({layout.expert}) must divide num_experts ({cfg.num_experts}) to be costed")
    state, f, mixed, decode, m = round_loads(cfg, layout, workload, options, batch, chunk)
    t_mixed, c_mixed = round_time(cfg, layout, hw, workload, options, mixed, m)
    t_decode, c_decode = round_time(cfg, layout, hw, workload, options, decode, m) if f < 1 else (t_mixed, c_mixed)
    round_s = f * t_mixed + (1 - f) * t_decode
    fit = memory_fit(cfg, layout, hw, workload, options, batch, chunk)
    groups = options.attention_groups(layout.expert)
    output_per_round = (state.decode + state.completions) * groups
    devices = layout.tensor * layout.expert * layout.stage

    def avg(term: str) -> float:
        return m * (f * getattr(c_mixed, term) + (1 - f) * getattr(c_decode, term))

    terms = {"compute": avg("t_compute"), "memory": avg("t_memory"),
             "comm": (1 - options.comm_overlap) * avg("t_comm"), "overhead": avg("t_overhead")}
    busy = f * m * c_mixed.time + (1 - f) * m * c_decode.time
    return Prediction(
        layout=str(layout), chunk_size=chunk, batch_size=batch * layout.data, feasible=fit.fits, reason=fit.reason,
        mem_per_device_bytes=fit.total, ttft_s=state.prefill_rounds * t_mixed, tpot_s=round_s,
        tokens_per_s_per_device=output_per_round / round_s / devices, tokens_per_s_per_user=1.0 / round_s,
        microbatches=m, bubble=1.0 - busy / round_s,
        t_compute_s=terms["compute"], t_memory_s=terms["memory"], t_comm_s=avg("t_comm"),
        bound=max(terms, key=terms.get),
    )
