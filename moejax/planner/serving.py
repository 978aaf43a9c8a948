"""Serving metrics under in-flight batching, chunked prefill and the runtime's pipeline schedule.

Steady-state fluid model. Per configuration, `features` computes every efficiency-free number (per round kind
and per distinct pipeline stage, `moejax.planner.cost.stage_features`) and `evaluate` turns them into TTFT,
TPOT and throughput with the efficiency curves. `evaluate` is elementwise over any leading axes and written for
any array module, so the sweep evaluates thousands of configurations in one NumPy call and calibration runs it
under `jax.vmap` and `jax.grad` (`moejax.planner.calibrate`).

Requests and groups:
- `batch` concurrent requests per replica (closed loop: a finishing request is replaced at once), each with
  `isl` prompt and `osl` output tokens (the first from its last prefill chunk, osl - 1 from decode steps).
- The pipeline schedule is the runtime's (`ServeConfig.microbatches`, here `Options.microbatches`): requests
  are split into M microbatch groups (default M = S stages). In engine tick t, stage s works on group
  (t - s) mod M; group g enters stage 0 at ticks t = g (mod M) if its previous work has left the last stage,
  else that slot is a bubble. So a group gets a turn every P = max(M, S) ticks; with M < S a fraction
  (S - M) / S of the stage slots idles. Activations cross each stage boundary with one send per tick.
- Inside a group, attention data parallelism (ADP, `moejax.planner.layout.PlanLayout`) splits requests over
  attention groups, each with its own prefill budget; their mixed turns coincide (as when a benchmark starts
  all of them together; the MoE's all-to-all makes every group wait for the slowest).
- A group's turn carries one decode token per decoding request and prefill in whole chunks of min(chunk, isl)
  tokens, at most `chunk` per turn per attention group. A request needs c = ceil(isl / chunk) turns of prefill;
  when prefill demand exceeds the budget requests queue and prefill stretches to
  n = requests x isl / chunk - (osl - 1) turns (fluid). Turns with prefill ("mixed") happen in a fraction f of
  turns; they and decode-only turns are costed apart (weight traffic is concave in the tokens of a turn).
- Prefix caching (`Workload.prefix_hit_rate` h): the first h x isl prompt tokens come from the cache, so isl
  above (chunks, turns, service) is the computed part (1 - h) x isl (`Workload.prefill_tokens`); the computed
  tokens sit after the cached ones and attend over them, and each chunk reads the cached prefix from the KV
  cache; decode and memory see the whole prompt.

Times (tick = slowest stage's time for one group's microbatch + the send + `step_overhead_s`):

    TPOT          = P x (f x tick_mixed + (1 - f) x tick_decode)
    TTFT          = wait + ((n - 1) x P + S) x tick_mixed             (chunks enter every P ticks; the first
                                                                       token leaves stage S-1 S ticks later)
    tokens/s/dev  = M x ADP x (decode + first tokens per turn) / P / mean tick / (MTP x EP x S)

Queueing (`Workload.arrival_rate`): None is the closed loop at `batch` concurrency: arrivals are the
completions, a new request joins the next turn and queues only when the prefill budget saturates (the fluid n
above). A Poisson rate lambda (requests/s over all replicas) adds the M/D/1 wait of the prefill budget of one
attention group of one microbatch group: service S_req = isl / chunk x P x tick_mixed, utilisation
rho = lambda_group x S_req, wait = P x tick_mixed / 2 (the next turn) + rho S_req / (2 (1 - rho)) (infinite
when rho >= 1: that rate cannot be served).

Data parallelism: replicas are independent; `batch_size` reported is requests over all replicas, and the
latency of a request does not depend on how many replicas there are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.cost import Load, device_features, op_times, sat, send_features, stage_features
from moejax.planner.hardware import Hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import memory_fit, microbatches, stages, windowed_layers
from moejax.planner.workload import Options, Workload

STAGE_SLOTS = 8  # distinct stage shapes costed per configuration (first, last, larger and smaller middles, ...)
SCHEDULE = ("stages", "microbatches", "period", "mixed_fraction", "prefill_turns", "service_turns",
            "tokens_per_turn", "devices", "arrival_rate", "comm_overlap")


@dataclass(frozen=True)
class SteadyState:
    """Per-turn averages of one attention group of one microbatch group in steady state."""

    decode: float  # decode tokens per turn
    prefill: float  # prefill tokens per turn
    completions: float  # requests finishing their prefill (= first tokens) per turn
    prefill_rounds: float  # turns from arrival to first token


def steady_state(requests: float, chunk: int, isl: float, osl: int) -> SteadyState:
    """Fluid steady state of `requests` concurrent requests sharing a prefill budget of `chunk` tokens per turn;
    `isl` is the prompt tokens prefill computes per request (the prefix cache's hits left out)."""
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
    bubble: float  # fraction of stage slots that idle (M < S)
    t_compute_s: float  # per period on the busiest stage
    t_memory_s: float
    t_comm_s: float
    bound: str  # 'compute' | 'memory' | 'comm' | 'overhead': the largest term on the busiest stage

    def as_dict(self) -> dict:
        return asdict(self)


def _busiest(total: float, groups: int) -> float:
    """Share of `total` units (requests, chunks) on the busiest of `groups` groups: whole units go to one group."""
    return max(total / groups, min(total, 1.0))


def round_loads(cfg: ModelConfig, layout: PlanLayout, workload: Workload, options: Options,
                batch: int, chunk: int) -> tuple[SteadyState, float, Load, Load, int]:
    """The two kinds of turns of one microbatch group of one replica, as loads.

    Returns:
        (steady state of one attention group of one microbatch group, fraction of turns that carry prefill, load
        of a turn with prefill, load of a decode-only turn, microbatch groups M).
    """
    groups = layout.attention_data
    isl, osl = workload.isl, workload.osl
    computed, cached = workload.prefill_tokens, workload.cached_tokens  # computed == isl, cached == 0 without hits
    m = microbatches(layout, max(1, batch // groups), options)
    state = steady_state(batch / groups / m, chunk, computed, osl)
    piece = min(chunk, computed)
    chunks_per_turn = state.prefill / piece  # of one attention group, averaged over turns
    mixed_fraction = min(1.0, chunks_per_turn)
    group_chunks = chunks_per_turn / mixed_fraction  # in a mixed turn; attention groups' mixed turns coincide
    chunks = groups * group_chunks
    decode = groups * state.decode
    group_decode = _busiest(decode, groups)
    finishing = state.completions / mixed_fraction  # the group's first tokens in a mixed turn
    context = isl + osl / 2.0
    decode_load = Load(decode=decode, group_decode=group_decode, logits=group_decode, decode_context=context)
    mixed_load = Load(
        decode=decode, prefill=chunks * piece, group_decode=group_decode, group_prefill=group_chunks * piece,
        logits=group_decode + finishing, chunks=group_chunks, decode_context=context,
        prefill_context=cached + (computed + 1) / 2.0, prefix=cached + (computed - piece) / 2.0,
    )
    return state, mixed_fraction, mixed_load, decode_load, m


def features(cfg: ModelConfig, layout: PlanLayout | Layout | str, hw: Hardware, workload: Workload,
             options: Options | None = None, batch: int = 1, chunk: int = 512) -> dict[str, np.ndarray]:
    """Every efficiency-free number of one configuration: stage features as [2 turn kinds, STAGE_SLOTS] arrays
    (mixed, decode-only; padded stages have `valid` 0), schedule and device numbers as scalars."""
    options = options or Options()
    lay = PlanLayout.of(layout, options.expert_mode)
    if cfg.num_experts % lay.expert:
        raise ValueError(f"expert ({lay.expert}) must divide num_experts ({cfg.num_experts}) to be costed")
    state, f, mixed, decode, m = round_loads(cfg, lay, workload, options, batch, chunk)
    shapes = list({(s.moe_layers, s.dense_layers, s.first, s.last, windowed_layers(cfg, s.layer_ids)): s
                   for s in stages(cfg, lay)}.values())
    if len(shapes) > STAGE_SLOTS:
        raise ValueError(f"more than {STAGE_SLOTS} distinct stage shapes")
    rows = [[stage_features(cfg, lay, hw, workload, options, s, load) | {"valid": 1.0} for s in shapes]
            for load in (mixed, decode)]
    pad = dict.fromkeys(rows[0][0], 0.0) | {k: 1.0 for k in rows[0][0] if k.endswith("_bw")}
    out = {k: np.array([[r[k] for r in turn] + [pad[k]] * (STAGE_SLOTS - len(turn)) for turn in rows])
           for k in rows[0][0]}
    out |= {k: np.array([v, v]) for k, v in send_features(cfg, lay, hw, workload, mixed).items()}
    out["send_bytes"] = np.array([send_features(cfg, lay, hw, workload, load)["send_bytes"] for load in (mixed,
                                                                                                       decode)])
    dev = device_features(hw, workload)
    out |= {k: np.full((2, STAGE_SLOTS), v) for k, v in dev.items()}
    s = lay.stage
    rate = workload.arrival_rate / (lay.data * lay.attention_data * m) if workload.arrival_rate else 0.0
    computed = workload.prefill_tokens
    sched = {"stages": s, "microbatches": m, "period": max(m, s), "mixed_fraction": f,
             "prefill_turns": state.prefill_rounds, "service_turns": computed / min(chunk, computed),
             "tokens_per_turn": m * lay.attention_data * (state.decode + state.completions),
             "devices": lay.group * s, "arrival_rate": rate, "comm_overlap": options.comm_overlap}
    return out | {k: np.float64(v) for k, v in sched.items()}


def evaluate(f: dict, eff: dict, xp=np) -> dict:
    """TTFT, TPOT, throughput and the busiest stage's breakdown from `features` (any leading axes; NumPy or
    jax.numpy) and efficiency parameters `eff` (formulas in the module docstring)."""
    t = op_times(f, eff, xp)
    stage = (t["roofline"] + (1.0 - f["comm_overlap"][..., None, None]) * t["comm"] + t["kernels"]) * f["valid"]
    sent = f["send_bytes"]  # [..., 2]
    send_t = xp.where(sent > 0, sent / (f["send_bw"] * eff["network"] * sat(sent, eff["network_bytes"]))
                      + f["send_lat"] + eff["collective_s"], 0.0)
    slowest = functools.reduce(xp.maximum, [stage[..., k] for k in range(STAGE_SLOTS)])  # [..., 2]; no jnp.max:
    # its gradient divides by the count of maxima, which XLA's fused equality under jit can make 0 (NaN)
    tick = slowest + send_t + eff["step_overhead_s"]
    fm = f["mixed_fraction"]
    mix, dec = tick[..., 0], tick[..., 1]
    mean_tick = fm * mix + (1.0 - fm) * dec
    period, stages = f["period"], f["stages"]
    service = f["service_turns"] * period * mix
    rho = f["arrival_rate"] * service
    wait = xp.where(f["arrival_rate"] > 0, period * mix / 2 + xp.where(
        rho < 1, rho * service / (2 * (1 - rho) + 1e-12), xp.inf), 0.0)
    weight = xp.stack([fm, 1.0 - fm], axis=-1)[..., None]  # turn-kind weights, broadcast over stage slots
    busiest = (xp.arange(STAGE_SLOTS) == xp.argmax(stage, axis=-1)[..., None]) * weight
    part = {k: period * xp.sum(busiest * t[k] * f["valid"], axis=(-2, -1)) for k in t}
    return {
        "ttft_s": wait + ((f["prefill_turns"] - 1) * period + stages) * mix,
        "tpot_s": period * mean_tick,
        "tokens_per_s_per_device": f["tokens_per_turn"] / period / mean_tick / f["devices"],
        "tokens_per_s_per_user": 1.0 / (period * mean_tick),
        "t_compute_s": part["compute"], "t_memory_s": part["memory"], "t_comm_s": part["comm"],
        "t_overhead_s": part["kernels"] + period * eff["step_overhead_s"],
        "tick_mixed_s": mix, "tick_decode_s": dec,
    }


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
    """Features of many configurations, stacked along a new leading axis."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _prediction(layout: str, batch: int, chunk: int, fit, m: int, stages: int, r: dict, overlap: float,
                data: int) -> Prediction:
    terms = {"compute": r["t_compute_s"], "memory": r["t_memory_s"], "comm": (1 - overlap) * r["t_comm_s"],
             "overhead": r["t_overhead_s"]}
    return Prediction(
        layout=layout, chunk_size=chunk, batch_size=batch * data, feasible=fit.fits, reason=fit.reason,
        mem_per_device_bytes=fit.total, ttft_s=float(r["ttft_s"]), tpot_s=float(r["tpot_s"]),
        tokens_per_s_per_device=float(r["tokens_per_s_per_device"]),
        tokens_per_s_per_user=float(r["tokens_per_s_per_user"]), microbatches=m,
        bubble=max(0.0, (stages - m) / stages), t_compute_s=float(r["t_compute_s"]),
        t_memory_s=float(r["t_memory_s"]), t_comm_s=float(r["t_comm_s"]), bound=max(terms, key=terms.get))


def predict_many(cfg: ModelConfig, configs: list[tuple], hw: Hardware, workload: Workload,
                 options: Options | None = None) -> list[Prediction]:
    """Predict many (layout, batch per replica, chunk) configurations with one vectorised evaluation."""
    options = options or Options()
    if not configs:
        return []
    lays = [PlanLayout.of(lay, options.expert_mode) for lay, _, _ in configs]
    feats = [features(cfg, lay, hw, workload, options, b, c) for lay, (_, b, c) in zip(lays, configs, strict=True)]
    r = evaluate(stack(feats), hw.efficiency.as_dict())
    out = []
    for i, (lay, (_, b, c)) in enumerate(zip(lays, configs, strict=True)):
        fit = memory_fit(cfg, lay, hw, workload, options, b, c)
        out.append(_prediction(str(lay), b, c, fit, int(feats[i]["microbatches"]), lay.stage,
                               {k: v[i] for k, v in r.items()}, options.comm_overlap, lay.data))
    return out


def predict(cfg: ModelConfig, layout: PlanLayout | Layout | str, hw: Hardware, workload: Workload,
            options: Options | None = None, batch: int = 1, chunk: int = 512) -> Prediction:
    """Predict TTFT, TPOT and throughput of one configuration.

    Args:
        cfg: the model.
        layout: parallel layout (a `Layout`, a `PlanLayout` or a string such as 'TP2EP16PP2' or 'TP8MTP1EP8').
        hw: hardware, with its efficiency curves.
        workload: request shape, formats and arrival model.
        options: modelling options (defaults: `Options()`).
        batch: concurrent requests per data-parallel replica.
        chunk: prefill tokens per turn per attention group.

    Returns:
        A `Prediction`; `feasible` is False (with `reason`) when the heaviest device runs out of memory.
    """
    return predict_many(cfg, [(layout, batch, chunk)], hw, workload, options)[0]
