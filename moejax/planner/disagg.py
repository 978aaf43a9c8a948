"""Disaggregated prefill / decode: prefill and decode on separate devices, each with its own layout.

NVIDIA Dynamo, SGLang's PD mode and vLLM's disaggregated prefill run x prefill instances of layout A and y decode
instances of layout B (x |A| + y |B| <= N devices) and move each request's KV cache from its prefill instance to
its decode instance. `plan_disaggregated` enumerates those systems and costs them with the aggregated planner's
one cost model (`moejax.planner.serving`):

- **Prefill instance** (layout A, concurrency b, chunk c): the serving model with osl = 1 (a request leaves
  after the token its last prefill chunk makes), `predict_many`. Its requests/s is its first tokens/s; its TTFT
  is the model's TTFT at that concurrency (closed loop: the prefill queue included).
- **Decode instance** (layout B, batch b): every turn decodes one token for each of its b requests (requests
  arrive with their prompt's KV cache; none prefills). Decode-only turns are costed by `serving.evaluate` on
  `cost.stage_features` of that load, with no mixed turn (`_decode_features`). Step time = TPOT;
  requests/s = b / TPOT / (osl - 1): the first token comes from prefill, the other osl - 1 from decode.
- **KV transfer**: ceil(isl / page) whole pages of `ServeConfig.page_size` tokens, each page
  page x `ModelConfig.kv_bytes_per_token` bytes (the runtime's formula, every layer); time = latency + bytes /
  (bandwidth x lanes), over NVLink when the devices used fit one NVLink domain, else the scale-out network
  (`Hardware.link`); lanes = min of the two instances' KV shards (attention TP x PP: each sends or receives its
  own slice in parallel). A link also caps a prefill instance's requests/s at lanes x bandwidth / bytes.
- **Rate matching**: the system serves min(x R_prefill, y R_decode) requests/s. For each x the best y is one of
  the two integers around x R_prefill / R_decode (throughput per device rises with y until decode stops being
  the bottleneck, then falls), within x |A| + y |B| <= N. TTFT = prefill TTFT + transfer + one decode step.
  tokens/s/device = requests/s x osl / devices used (the devices left over could run another copy);
  tokens/s/user = 1 / TPOT of the decode batch.

Bounds (so a run stays short): instance sizes are the powers of two and divisors of N below N (at most
`MAX_SIZES`, the largest kept); layouts with a DP factor are left out (DP within an instance is the same as more
instances); prefill candidates are thinned to each instance size's Pareto set of (requests/s/device, TTFT) and
decode candidates to each size's Pareto set of (requests/s/device, tokens/s/user); x <= `MAX_PREFILL_INSTANCES`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moejax.config import ModelConfig
from moejax.engine.config import ServeConfig
from moejax.planner.cost import Load, device_features, send_features, stage_features
from moejax.planner.hardware import Hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import memory_fit, microbatches, stages, windowed_layers
from moejax.planner.report import format_table, pareto_figure
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import STAGE_SLOTS, evaluate, predict_many, stack
from moejax.planner.sweep import DEFAULT_BATCHES, DEFAULT_CHUNKS, Plan, plan
from moejax.planner.workload import Options, Workload

PAGE_SIZE = ServeConfig.page_size  # the runtime's default KV page (tokens)
MAX_SIZES = 12  # instance sizes tried
MAX_PREFILL_INSTANCES = 64  # x
TIE = 0.01  # throughputs within 1% are a tie, broken by the lower TTFT


# ---- KV transfer ---------------------------------------------------------------------------------------------

def kv_transfer_bytes(cfg: ModelConfig, workload: Workload, page_size: int = PAGE_SIZE) -> float:
    """Bytes of one request's prompt KV cache moved from prefill to decode: whole pages, ceil(isl / page_size) of
    them, each page_size x `ModelConfig.kv_bytes_per_token` (all layers, scales of a quantized cache included)."""
    pages = -(-workload.isl // page_size)
    return pages * page_size * cfg.kv_bytes_per_token(workload.kv_precision)


def kv_lanes(layout: PlanLayout) -> int:
    """Links one instance moves a request's KV over in parallel: its attention TP x PP devices each hold a slice."""
    return layout.tensor * layout.stage


def kv_transfer_time(nbytes: float, bandwidth: float, latency: float = 0.0, lanes: int = 1) -> float:
    """Seconds to move `nbytes` over `lanes` links of `bandwidth` bytes/s each (per direction)."""
    return latency + nbytes / (bandwidth * lanes)


# ---- instances -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    """One prefill or decode instance's predicted service (chunk 0 for decode)."""

    role: str  # 'prefill' | 'decode'
    layout: str
    devices: int
    lanes: int
    batch_size: int
    chunk_size: int
    feasible: bool
    reason: str
    mem_per_device_bytes: float
    requests_per_s: float  # of the whole instance
    ttft_s: float  # prefill: the request's time in the instance; decode: 0
    tpot_s: float  # decode: step time; prefill: 0

    @property
    def rate_per_device(self) -> float:
        return self.requests_per_s / self.devices


def prefill_instances(cfg: ModelConfig, hw: Hardware, workload: Workload, options: Options,
                      layouts: Sequence[PlanLayout], batches: Sequence[int], chunks: Sequence[int]) -> list[Instance]:
    """Every (layout, concurrency, chunk) of a prefill instance: the serving model at osl = 1."""
    only_prefill = dataclasses.replace(workload, osl=1, arrival_rate=None)
    configs = [(lay, b, c) for lay in layouts for b in batches for c in chunks]
    out = []
    for (lay, _, _), p in zip(configs, predict_many(cfg, configs, hw, only_prefill, options), strict=True):
        devices = lay.size
        out.append(Instance("prefill", p.layout, devices, kv_lanes(lay), p.batch_size, p.chunk_size, p.feasible,
                            p.reason, p.mem_per_device_bytes, p.tokens_per_s_per_device * devices, p.ttft_s, 0.0))
    return out


def _decode_features(cfg: ModelConfig, lay: PlanLayout, hw: Hardware, workload: Workload, options: Options,
                     batch: int) -> dict[str, np.ndarray]:
    """`serving.features` of a decode-only instance: both turn kinds are the decode turn of `batch` requests
    (every request decodes every turn), and no turn carries prefill."""
    groups = lay.attention_data
    m = microbatches(lay, max(1, batch // groups), options)
    decode = batch / m
    group_decode = max(decode / groups, min(decode, 1.0))  # whole requests go to one group (`serving._busiest`)
    load = Load(decode=decode, group_decode=group_decode, logits=group_decode,
                decode_context=workload.isl + workload.osl / 2.0)
    shapes = list({(s.moe_layers, s.dense_layers, s.first, s.last, windowed_layers(cfg, s.layer_ids)): s
                   for s in stages(cfg, lay)}.values())
    rows = [stage_features(cfg, lay, hw, workload, options, s, load) | {"valid": 1.0} for s in shapes]
    pad = dict.fromkeys(rows[0], 0.0) | {k: 1.0 for k in rows[0] if k.endswith("_bw")}
    turn = {k: [r[k] for r in rows] + [pad[k]] * (STAGE_SLOTS - len(rows)) for k in rows[0]}
    out = {k: np.array([v, v]) for k, v in turn.items()}
    out |= {k: np.array([v, v]) for k, v in send_features(cfg, lay, hw, workload, load).items()}
    out |= {k: np.full((2, STAGE_SLOTS), v) for k, v in device_features(hw, workload).items()}
    sched = {"stages": lay.stage, "microbatches": m, "period": max(m, lay.stage), "mixed_fraction": 0.0,
             "prefill_turns": 1.0, "service_turns": 0.0, "tokens_per_turn": decode, "devices": lay.group * lay.stage,
             "arrival_rate": 0.0, "comm_overlap": options.comm_overlap}
    return out | {k: np.float64(v) for k, v in sched.items()}


def decode_instances(cfg: ModelConfig, hw: Hardware, workload: Workload, options: Options,
                     layouts: Sequence[PlanLayout], batches: Sequence[int]) -> list[Instance]:
    """Every (layout, batch) of a decode instance; requests/s = batch / TPOT / (osl - 1)."""
    configs = [(lay, b) for lay in layouts for b in batches]
    if not configs:
        return []
    r = evaluate(stack([_decode_features(cfg, lay, hw, workload, options, b) for lay, b in configs]),
                 hw.efficiency.as_dict())
    out = []
    for i, (lay, b) in enumerate(configs):
        fit = memory_fit(cfg, lay, hw, workload, options, b, 1)
        tpot = float(r["tpot_s"][i])
        out.append(Instance("decode", str(lay), lay.size, kv_lanes(lay), b, 0, fit.fits, fit.reason, fit.total,
                            b / tpot / (workload.osl - 1), 0.0, tpot))
    return out


def _pareto(items: list[Instance], better) -> list[Instance]:
    """Items not beaten on both keys of `better(item) -> (a, b)` (larger is better on both)."""
    ordered = sorted(items, key=lambda it: tuple(-v for v in better(it)))
    front, best = [], -math.inf
    for it in ordered:
        if better(it)[1] > best:
            front.append(it)
            best = better(it)[1]
    return front


def candidates(instances: list[Instance], better) -> list[Instance]:
    """Feasible instances thinned to each instance size's Pareto set under `better`."""
    by_size: dict[int, list[Instance]] = {}
    for it in instances:
        if it.feasible and it.requests_per_s > 0:
            by_size.setdefault(it.devices, []).append(it)
    return [it for size in sorted(by_size) for it in _pareto(by_size[size], better)]


# ---- systems -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DisaggConfig:
    """x prefill instances + y decode instances and what they serve together. Times in seconds."""

    prefill_layout: str
    decode_layout: str
    prefill_instances: int  # x
    decode_instances: int  # y
    prefill_devices: int  # x |A|
    decode_devices: int  # y |B|
    devices: int  # used: x |A| + y |B|
    prefill_batch_size: int
    prefill_chunk_size: int
    decode_batch_size: int
    link: str  # 'nvlink' | 'network'
    kv_bytes_per_request: float
    transfer_s: float
    prefill_ttft_s: float
    ttft_s: float  # prefill + transfer + one decode step
    tpot_s: float
    requests_per_s: float  # the system: min(prefill, decode)
    prefill_requests_per_s: float  # x instances
    decode_requests_per_s: float  # y instances
    bottleneck: str  # 'prefill' | 'decode'
    tokens_per_s_per_device: float
    tokens_per_s_per_user: float

    def as_dict(self) -> dict:
        return asdict(self)


def match_rates(pre: Instance, dec: Instance, hw: Hardware, n_devices: int, osl: int, kv_bytes: float,
                max_x: int = MAX_PREFILL_INSTANCES) -> DisaggConfig | None:
    """The best (x, y) for one prefill and one decode instance within `n_devices` (None: none fits)."""
    rows = match_many([pre], [dec], hw, n_devices, osl, kv_bytes, max_x)
    return rows[0] if rows else None


def match_many(pres: list[Instance], decs: list[Instance], hw: Hardware, n_devices: int, osl: int, kv_bytes: float,
               max_x: int = MAX_PREFILL_INSTANCES) -> list[DisaggConfig]:
    """For every (prefill, decode) candidate pair, its best (x, y): highest tokens/s/device, then lowest TTFT."""
    if not pres or not decs:
        return []
    a = np.array([p.devices for p in pres], float)[:, None, None]
    b = np.array([d.devices for d in decs], float)[None, :, None]
    rp = np.array([p.requests_per_s for p in pres])[:, None, None]
    rd = np.array([d.requests_per_s for d in decs])[None, :, None]
    lanes = np.minimum(np.array([p.lanes for p in pres], float)[:, None, None],
                       np.array([d.lanes for d in decs], float)[None, :, None])
    x = np.arange(1, max_x + 1, dtype=float)[None, None, :]
    y_max = np.floor((n_devices - x * a) / b)
    best = None
    for y in (np.floor(x * rp / rd), np.ceil(x * rp / rd)):
        y = np.minimum(np.maximum(y, 1.0), y_max)
        ok = (y >= 1) & (x * a + y * b <= n_devices)
        used = np.where(ok, x * a + y * b, 1.0)
        nvlink = used <= hw.nvlink_domain
        bw = np.where(nvlink, hw.nvlink_bandwidth, hw.network_bandwidth)
        lat = np.where(nvlink, hw.nvlink_latency_s, hw.network_latency_s)
        rp_link = np.minimum(rp, lanes * bw / kv_bytes)  # a prefill instance's output is capped by its link
        rate = np.minimum(x * rp_link, y * rd)
        tps = np.where(ok, rate * osl / used, -1.0)
        cand = {"y": y, "used": used, "nvlink": nvlink, "transfer": kv_transfer_time(kv_bytes, bw, lat, lanes),
                "rate": rate, "rp": x * rp_link, "rd": y * rd, "tps": tps}
        if best is None:
            best = {k: np.broadcast_to(v, tps.shape).copy() for k, v in cand.items()}
        else:
            take = tps > best["tps"]
            for k, v in cand.items():
                best[k] = np.where(take, v, best[k])
    k = np.argmax(best["tps"], axis=-1)  # the first x reaching the best: the smallest system
    out = []
    for i, p in enumerate(pres):
        for j, d in enumerate(decs):
            kk = k[i, j]
            if best["tps"][i, j, kk] <= 0:
                continue
            xi, yi = kk + 1, int(best["y"][i, j, kk])
            transfer = float(best["transfer"][i, j, kk])
            rp_sys, rd_sys = float(best["rp"][i, j, kk]), float(best["rd"][i, j, kk])
            out.append(DisaggConfig(
                prefill_layout=p.layout, decode_layout=d.layout, prefill_instances=int(xi), decode_instances=yi,
                prefill_devices=int(xi * p.devices), decode_devices=yi * d.devices,
                devices=int(best["used"][i, j, kk]), prefill_batch_size=p.batch_size,
                prefill_chunk_size=p.chunk_size, decode_batch_size=d.batch_size,
                link="nvlink" if best["nvlink"][i, j, kk] else "network", kv_bytes_per_request=kv_bytes,
                transfer_s=transfer, prefill_ttft_s=p.ttft_s, ttft_s=p.ttft_s + transfer + d.tpot_s,
                tpot_s=d.tpot_s, requests_per_s=float(best["rate"][i, j, kk]), prefill_requests_per_s=rp_sys,
                decode_requests_per_s=rd_sys, bottleneck="prefill" if rp_sys < rd_sys else "decode",
                tokens_per_s_per_device=float(best["tps"][i, j, kk]), tokens_per_s_per_user=1.0 / d.tpot_s))
    return out


def _best_per_pair(rows: list[DisaggConfig]) -> list[DisaggConfig]:
    """One row per (prefill layout, decode layout, decode batch): the highest tokens/s/device, and among rows
    within `TIE` of it the lowest TTFT (a prefill queue that adds no throughput only adds latency)."""
    groups: dict[tuple, list[DisaggConfig]] = {}
    for r in rows:
        groups.setdefault((r.prefill_layout, r.decode_layout, r.decode_batch_size), []).append(r)
    out = []
    for rs in groups.values():
        top = max(r.tokens_per_s_per_device for r in rs)
        out.append(min((r for r in rs if r.tokens_per_s_per_device >= (1 - TIE) * top), key=lambda r: r.ttft_s))
    return out


def disagg_frontier(rows: list[DisaggConfig]) -> list[DisaggConfig]:
    """Rows not beaten on both tokens/s/device and tokens/s/user, by rising tokens/s/user."""
    ordered = sorted(rows, key=lambda r: (-r.tokens_per_s_per_user, -r.tokens_per_s_per_device, r.ttft_s))
    front, best = [], -math.inf
    for r in ordered:
        if r.tokens_per_s_per_device > best:
            front.append(r)
            best = r.tokens_per_s_per_device
    return front[::-1]


def rank_disagg(rows: list[DisaggConfig], target_tps_user: float = 0.0) -> list[DisaggConfig]:
    """Rows at tokens/s/user >= target, best tokens/s/device first, one per (prefill layout, decode layout)."""
    ok = sorted((r for r in rows if r.tokens_per_s_per_user >= target_tps_user),
                key=lambda r: (-r.tokens_per_s_per_device, r.ttft_s))
    seen, out = set(), []
    for r in ok:
        if (r.prefill_layout, r.decode_layout) not in seen:
            seen.add((r.prefill_layout, r.decode_layout))
            out.append(r)
    return out


# ---- the plan ------------------------------------------------------------------------------------------------

def instance_sizes(n_devices: int, limit: int = MAX_SIZES) -> list[int]:
    """Devices per instance: powers of two and divisors of `n_devices` below it, the `limit` largest."""
    powers = {1 << k for k in range(n_devices.bit_length()) if 1 << k < n_devices}
    divisors = {d for k in range(1, math.isqrt(n_devices) + 1) if n_devices % k == 0
                for d in (k, n_devices // k) if d < n_devices}
    return sorted(powers | divisors)[-limit:]


def instance_layouts(cfg: ModelConfig, hw: Hardware, n_devices: int, rules: Rules) -> list[PlanLayout]:
    """Layouts of every instance size the rules accept, without a DP factor (more instances are the DP)."""
    out = []
    for size in instance_sizes(n_devices):
        layouts, _ = enumerate_layouts(size, cfg, rules, hw.nvlink_domain)
        out += [PlanLayout.of(lay) for lay in layouts if lay.data == 1]
    return out


@dataclass
class DisaggPlan:
    """A disaggregated planner run, with the aggregated plan of the same devices beside it."""

    model: str
    hardware: str
    devices: int
    workload: Workload
    options: Options
    target_tps_user: float
    page_size: int
    kv_bytes_per_request: float
    sizes: list[int]
    nvlink_domain: int
    instances: dict[str, int]  # counts: layouts, prefill / decode configs, candidates
    configs: list[DisaggConfig]
    aggregated: Plan
    seconds: float = 0.0
    pareto: list[DisaggConfig] = field(default_factory=list)
    ranking: list[DisaggConfig] = field(default_factory=list)

    def to_json(self, top: int | None = None) -> dict:
        """`Plan.to_json`'s keys for the disaggregated systems, and `aggregated` (its pareto and ranking)."""
        agg = self.aggregated
        return {
            "mode": "disaggregated", "model": self.model, "hardware": self.hardware, "devices": self.devices,
            "workload": vars(self.workload), "options": vars(self.options), "target_tps_user": self.target_tps_user,
            "page_size": self.page_size, "kv_bytes_per_request": self.kv_bytes_per_request,
            "instance_sizes": self.sizes, "count": self.instances | {"configs": len(self.configs)},
            "configs": [r.as_dict() for r in self.configs] if top is None else None,
            "pareto": [r.as_dict() for r in self.pareto],
            "ranking": [r.as_dict() for r in self.ranking[:top]],
            "aggregated": {"count": agg.count, "pareto": [p.as_dict() for p in agg.pareto],
                           "ranking": [p.as_dict() for p in agg.ranking[:top]]},
        }


def plan_disaggregated(cfg: ModelConfig, hw: Hardware, devices: int, workload: Workload,
                       options: Options | None = None, rules: Rules | None = None,
                       batches: Sequence[int] = DEFAULT_BATCHES, chunks: Sequence[int] = DEFAULT_CHUNKS,
                       target_tps_user: float = 20.0, page_size: int = PAGE_SIZE) -> DisaggPlan:
    """Enumerate and cost x prefill + y decode instances on `devices` devices, beside the aggregated plan."""
    if devices < 2:
        raise ValueError(f"disaggregated serving needs at least 2 devices (prefill and decode apart), got {devices}")
    if workload.osl < 2:
        raise ValueError(f"disaggregated serving needs osl >= 2 (the first token comes from prefill, the rest "
                         f"from decode), got {workload.osl}")
    options, rules = options or Options(), rules or Rules()
    layouts = instance_layouts(cfg, hw, devices, rules)
    pre_all = prefill_instances(cfg, hw, workload, options, layouts, batches, chunks)
    dec_all = decode_instances(cfg, hw, workload, options, layouts, batches)
    pres = candidates(pre_all, lambda it: (it.rate_per_device, -it.ttft_s))
    decs = candidates(dec_all, lambda it: (it.rate_per_device, 1.0 / it.tpot_s))
    kv_bytes = kv_transfer_bytes(cfg, workload, page_size)
    rows = _best_per_pair(match_many(pres, decs, hw, devices, workload.osl, kv_bytes))
    aggregated = plan(cfg, hw, devices, workload, options, rules, batches, chunks, target_tps_user)
    result = DisaggPlan(
        model=cfg.name or cfg.family, hardware=hw.name, devices=devices, workload=workload, options=options,
        target_tps_user=target_tps_user, page_size=page_size, kv_bytes_per_request=kv_bytes,
        sizes=instance_sizes(devices), nvlink_domain=hw.nvlink_domain,
        instances={"layouts": len(layouts), "prefill_configs": len(pre_all), "decode_configs": len(dec_all),
                   "prefill_feasible": sum(p.feasible for p in pre_all),
                   "decode_feasible": sum(d.feasible for d in dec_all),
                   "prefill_candidates": len(pres), "decode_candidates": len(decs)},
        configs=rows, aggregated=aggregated)
    result.pareto = disagg_frontier(rows)
    result.ranking = rank_disagg(rows, target_tps_user)
    return result


# ---- outputs -------------------------------------------------------------------------------------------------

DISAGG_FIELDS = list(DisaggConfig.__dataclass_fields__)


def format_disagg_table(rows: list[DisaggConfig], limit: int = 15) -> str:
    """A fixed-width table of disaggregated systems."""
    header = (f"{'#':>3} {'prefill':<12} {'decode':<12} {'x':>3} {'y':>3} {'split':>7} {'p.batch':>7} "
              f"{'chunk':>6} {'d.batch':>7} {'TTFT s':>7} {'xfer ms':>8} {'tok/s/dev':>10} {'tok/s/user':>10} "
              f"{'bound':<7}")
    lines = [header, "-" * len(header)]
    for i, r in enumerate(rows[:limit], 1):
        lines.append(f"{i:>3} {r.prefill_layout:<12} {r.decode_layout:<12} {r.prefill_instances:>3} "
                     f"{r.decode_instances:>3} {f'{r.prefill_devices}+{r.decode_devices}':>7} "
                     f"{r.prefill_batch_size:>7} {r.prefill_chunk_size:>6} {r.decode_batch_size:>7} "
                     f"{r.ttft_s:>7.3f} {r.transfer_s * 1e3:>8.3f} {r.tokens_per_s_per_device:>10.1f} "
                     f"{r.tokens_per_s_per_user:>10.1f} {r.bottleneck:<7}")
    return "\n".join(lines)


def format_disagg_summary(result: DisaggPlan, limit: int = 15, paths: dict | None = None) -> str:
    """What `moejax plan --disaggregated` prints: the bounds, the ranking, and the aggregated best beside it."""
    w, c, agg = result.workload, result.instances, result.aggregated
    out = [f"moejax plan --disaggregated: {result.model} on {result.devices} x {result.hardware}, weights "
           f"{w.precision}, KV {w.kv_precision}, isl {w.isl}, osl {w.osl}, expert mode "
           f"'{result.options.expert_mode}'",
           f"Instance sizes (devices): {', '.join(map(str, result.sizes))}; {c['layouts']} layouts without DP; "
           f"prefill configurations {c['prefill_configs']} ({c['prefill_feasible']} fit), decode "
           f"{c['decode_configs']} ({c['decode_feasible']} fit); candidates {c['prefill_candidates']} prefill x "
           f"{c['decode_candidates']} decode, x <= {MAX_PREFILL_INSTANCES} prefill instances",
           f"KV transfer per request: ceil({w.isl} / {result.page_size}) pages = "
           f"{result.kv_bytes_per_request / 2**20:.1f} MiB, over NVLink where a system's devices fit one NVLink domain "
           f"of {result.nvlink_domain}, else the scale-out network",
           "", f"Best disaggregated systems at >= {result.target_tps_user:g} tokens/s/user "
               f"({len(result.ranking)} layout pairs qualify; split = prefill + decode devices):"]
    out.append(format_disagg_table(result.ranking, limit) if result.ranking else "  (none: lower --target-tps-user)")
    out += ["", f"Aggregated, the same {result.devices} devices, best per layout at >= "
                f"{result.target_tps_user:g} tokens/s/user:"]
    out.append(format_table(agg.ranking, min(limit, 5)) if agg.ranking else "  (none)")
    out += ["", "Frontiers (tokens/s/user: tokens/s/device), disaggregated vs aggregated:"]
    out += [f"  disaggregated: {_points(result.pareto)}", f"  aggregated:    {_points(agg.pareto)}"]
    if result.ranking and agg.ranking:
        d, a = result.ranking[0].tokens_per_s_per_device, agg.ranking[0].tokens_per_s_per_device
        out.append(f"At the target: disaggregated {d:.1f} vs aggregated {a:.1f} tokens/s/device "
                   f"({'disaggregated' if d > a else 'aggregated'} wins, {max(d, a) / min(d, a):.2f}x)")
    if paths:
        out += [""] + [f"{name}: {path}" for name, path in paths.items()]
    out.append(f"planned in {result.seconds:.2f} s")
    return "\n".join(out)


def _points(rows, limit: int = 8) -> str:
    step = max(1, math.ceil(len(rows) / limit))
    return ", ".join(f"{r.tokens_per_s_per_user:.0f}: {r.tokens_per_s_per_device:.0f}" for r in rows[::step])


def plot_disagg(result: DisaggPlan, path, max_layouts: int = 6):
    """The aggregated Pareto figure (`report.pareto_figure`) with the disaggregated frontier drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(result.aggregated, max_layouts)
    ax = fig.axes[0]
    for line in ax.get_lines():
        if line.get_label() == "Pareto frontier":
            line.set_label("aggregated Pareto frontier")
    front = result.pareto
    ax.plot([r.tokens_per_s_per_user for r in front], [r.tokens_per_s_per_device for r in front], color="crimson",
            lw=2.5, ls="--", marker="s", ms=5, label="disaggregated frontier (x prefill + y decode)", zorder=6)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{ax.get_title()}: aggregated vs disaggregated")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_disagg_outputs(result: DisaggPlan, out_dir, plot: bool = True, full_json: bool = False) -> dict:
    """Write disagg.csv (every system), disagg_pareto.csv, (if `plot`) disagg.png and (if `full_json`)
    disagg.json into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("disagg_csv", result.configs), ("disagg_pareto_csv", result.pareto)):
        path = out_dir / f"{name[:-4]}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=DISAGG_FIELDS)
            writer.writeheader()
            writer.writerows(r.as_dict() for r in rows)
        paths[name] = path
    if full_json:
        paths["disagg_json"] = out_dir / "disagg.json"
        paths["disagg_json"].write_text(json.dumps(result.to_json()))
    if plot:
        paths["disagg_png"] = plot_disagg(result, out_dir / "disagg.png")
    return paths
