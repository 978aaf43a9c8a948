"""Cost of one microbatch through one pipeline stage on one device: shape-aware operations, collectives, launches.

The unit is one *microbatch* (one pipeline group's tokens, `Load`) passing through one *stage* on one device.
`stage_features` turns it into numbers that do not depend on efficiencies (FLOPs, bytes, rows, message sizes,
kernel counts); `op_times` turns those into seconds with the hardware's efficiency curves
(`moejax.planner.hardware.Efficiency`). `op_times` is written once for any array module: NumPy for the sweep,
`jax.numpy` under `jax.vmap` / `jax.grad` for calibration (`moejax.planner.calibrate`).

Operation classes, each a roofline of its own (compute and memory traffic overlap inside an operation, not
across operations):

    sat(x, h)   = x / (x + h)                                   (a saturating efficiency curve, 0 -> 1)
    t_gemm      = max(F / (P * compute * nar * sat(rows, compute_rows)),  W / (B * memory * sat(w, memory_bytes)))
    t_moe       = max(skew F / (P * grouped * nar_g * sat(r, grouped_rows) * sat(F_e, grouped_width)),
                      W / (B * memory * sat(w, memory_bytes)))
    t_head      = as t_gemm, in bf16, rows = tokens needing logits (last stage only)
    t_attention = max(F / (P_bf16 * attention * sat(c, attention_context)),
                      KV / (B * attention_memory * sat(kv_layer, attention_bytes)))
    t_coll      = count * (wire / (link * network * sat(msg, network_bytes)) + steps * link_latency + collective_s)
    skew        = 1 + routing_skew * sqrt(2 ln EP / (E / EP))     (busiest of EP expert ranks; all-to-all too)
    t_act       = activation bytes / (B * memory)
    t_stage     = t_gemm + t_moe + t_head + t_attention + t_act + (1 - comm_overlap) * sum(t_coll)
                  + kernels * kernel_s

with F FLOPs, W weight bytes, w bytes of one weight matrix, rows the GEMM's tokens, r tokens per expert hit
(the replica's n tokens x X / (E x hit), hit below), F_e the expert width per device (F / MTP), c the mean
cached positions a token attends to, nar (nar_g) = `narrow` (`narrow_grouped`) for fp8/fp4 GEMMs else 1, KV the
cache bytes read and written.

- FLOPs: 2 per multiply-add. Linear layers 2 x params per token. Attention 2 N (Hqk + Hv) per cached position;
  MLA decode absorbed (Hqk = kv_lora + R, Hv = kv_lora), MLA prefill expanded (Hqk = H + R, Hv = v_head_dim).
  Cached positions per layer are capped by the sliding window on windowed layers (`cached_positions`, the
  stage's own layers).
- Activations: per layer and token 8 D + 3 (N Hqk + K (Hqk + Hv)) / TP values around attention (norms,
  residuals, projections' outputs; 8 D + 3 (N + 2 K) H / TP for GQA) and, per routed token-expert on the
  device, 4 D + 6 F / MTP (permute, expert intermediates, activation, un-permute), streamed at `memory` x
  bandwidth (t_act).
- Weights read: a stage's non-expert weights once per microbatch; the experts at least one token routes to:
  with n tokens choosing X of E uniformly, an expert is hit with probability 1 - (1 - X/E)^n.
- KV: decode tokens read their request's cache; prefill chunks write theirs and read their prefix once (a
  prefix-cache hit's pages included: those tokens are read, not computed or written).
- Sizes: the padded ones the runtime stores (`moejax.planner.memory.stored_config`): vocabulary and FFN widths
  (routed, shared, dense) rounded up, so the LM head's and the FFNs' FLOPs and bytes include the padding.
- Split (`moejax.planner.layout.PlanLayout`): attention, shared/dense FFN and router on the busiest attention
  group's tokens over attention TP (MLA's down-projections replicated over it; the shared expert and dense FFNs
  over TP x EP where attention is replicated over the expert group, `PlanLayout.shared_split`); routed experts on
  the replica's tokens over MoE TP x EP.
- Collectives per layer, the ones the runtime runs (`moejax.sharding.Parallelism`: gather, exchange, scatter and
  reduce axes), from the mesh axes of the layout (`moejax.mesh.Layout.split_factors` of `PlanLayout.layout`:
  x tensor, y tensor_expert, z data_tensor, w expert; a runtime layout is (TP, 1, 1, EP)). Messages are the
  busiest attention group's activations (tokens x D x act bytes):
  - an all-reduce over attention TP (t = x y) after attention, and after each dense FFN;
  - MoE layers, with attention data-parallel inside the group (the 'dp_attention' mode; every split layout):
    where z > 1 an all-gather of the group's tokens over z before the experts and a reduce-scatter after (on the
    wire an all-reduce over z of the z-times-gathered message: 2 (z-1) x the group's message); where w > 1 an
    all-to-all dispatch + combine over the EP = y w expert ranks, each device sending its z / y share of the
    gathered tokens (a `tensor_expert` slice of the tokens attention replicated) to the distinct remote ranks its
    top-X experts live on (`expert_fanout` (EP - 1) / EP, bounded by group-limited routing: at most the ranks
    `topk_group` expert groups span); then one all-reduce over attention TP that also finishes the shared expert;
  - MoE layers and dense FFNs with attention replicated over the expert group (the runtime's
    'replicated_attention' mode): one all-reduce over the whole group (MTP x EP) in place of the TP one.
  The expected fanout makes this a prediction of the bytes routing sends; the runtime's all-to-all has a fixed
  row capacity, whose bound `moejax.bench.comm.planner_volume(exchange="capacity")` counts. The routing ids and
  gates that ride along with the tokens (X of each per token) are left out (under 1% of a token's D values at
  real widths). Ring algorithms: an all-reduce sends 2 (n-1)/n of the message with 2 ceil(log2 n) latency steps.
  Groups within one NVLink domain use NVLink, otherwise the scale-out network (`Hardware.link`); placement is
  tensor innermost (then tensor_expert, data_tensor), then expert, then stage, then data.
- Kernels: per layer 4 for attention (norm, QKV, attention, output), 7 per MoE block (norm, router, top-k and
  permute, two grouped GEMMs, activation, un-permute), +3 for a shared expert, 4 per dense FFN; +1 embedding on
  the first stage, +2 (LM head, sampling) on the last.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.hardware import Hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import StageShape, cached_positions, kv_bytes_per_token_layer, param_counts, stored_config
from moejax.planner.workload import Options, Workload

COLLECTIVES = ("tp", "moe", "gather", "a2a")  # TP all-reduces, MoE-group all-reduce, MoE-TP gather, all-to-all


@dataclass(frozen=True)
class Load:
    """Tokens of one microbatch: the replica's totals (what the MoE blocks see) and the busiest attention group's.

    With attention replicated (`expert_mode='replicated_attention'`) there is one attention group and both views agree.

    Attributes:
        decode: decode tokens in the replica (one per decoding request).
        prefill: prefill tokens in the replica.
        group_decode: decode tokens of the busiest attention group.
        group_prefill: prefill tokens of the busiest attention group.
        logits: tokens of the busiest group that need logits (decode tokens and finishing prompts).
        chunks: prefill chunks of the busiest group (each reads its prefix of the KV cache once).
        decode_context: mean cached positions a decode token attends to.
        prefill_context: mean positions a prefill token attends to (causal: about half the prompt; with prefix
            caching, the cached prefix plus about half the computed part).
        prefix: mean prefix length of the chunks (the cached prefix included: a chunk reads it from the cache).
    """

    decode: float = 0.0
    prefill: float = 0.0
    group_decode: float = 0.0
    group_prefill: float = 0.0
    logits: float = 0.0
    chunks: float = 0.0
    decode_context: float = 0.0
    prefill_context: float = 0.0
    prefix: float = 0.0

    @property
    def tokens(self) -> float:
        return self.decode + self.prefill

    @property
    def group_tokens(self) -> float:
        return self.group_decode + self.group_prefill


@dataclass(frozen=True)
class StageCost:
    """Per-device cost of one microbatch through one stage (seconds, FLOPs, bytes).

    `t_compute` and `t_memory` sum each operation's compute and memory time; `t_roofline` sums each operation's
    larger one; `t_overhead` is the kernels' launch time.
    """

    flops: float
    bytes_read: float
    comm_bytes: float
    t_compute: float
    t_memory: float
    t_roofline: float
    t_comm: float
    t_overhead: float
    comm_overlap: float = 0.0

    @property
    def time(self) -> float:
        return self.t_roofline + (1.0 - self.comm_overlap) * self.t_comm + self.t_overhead


@functools.lru_cache(maxsize=1024)
def expert_fanout(num_experts: int, top_k: int, expert_parallel: int, n_group: int = 1, topk_group: int = 1
                  ) -> float:
    """Expected number of distinct expert ranks a token's top-k experts live on (uniform routing).

    Rank r holds experts [r E/EP, (r+1) E/EP) (as the runtime places them); group g, [g E/G, (g+1) E/G).
    Group-limited routing (DeepSeek-V3, GLM-4.5: G = `n_group`, `topk_group`) picks topk_group groups, then the
    top-k experts among the pool of theirs, m = topk_group E/G; uniform routing: the groups uniformly, then k of
    the pool uniformly. Rank r is missed when none of the k falls among the c_r pool experts it holds:
    P(miss | groups) = C(m - c_r, k) / C(m, k), averaged over the choices of groups by counting the chosen groups
    that overlap rank r (exact, without enumerating the C(G, topk_group) choices). G = 1 gives
    EP (1 - C(E - E/EP, k) / C(E, k)). Never above `expert_fanout_bound`.
    """
    per_rank, per_group = num_experts // expert_parallel, num_experts // n_group
    pool = topk_group * per_group
    choices = math.comb(n_group, topk_group) * math.comb(pool, top_k)
    hit = 0.0
    for lo in range(0, num_experts, per_rank):
        overlaps = _overlaps(lo, lo + per_rank, per_group, n_group)
        ways = {(0, 0): 1}  # (overlapping groups chosen, pool experts on the rank) -> choices of those groups
        for o in overlaps:
            nxt = dict(ways)
            for (chosen, held), w in ways.items():
                nxt[chosen + 1, held + o] = nxt.get((chosen + 1, held + o), 0) + w
            ways = nxt
        others = n_group - len(overlaps)
        miss = sum(w * math.comb(others, topk_group - chosen) * math.comb(pool - held, top_k)
                   for (chosen, held), w in ways.items() if chosen <= topk_group)
        hit += 1.0 - miss / choices
    return hit


def expert_fanout_bound(num_experts: int, top_k: int, expert_parallel: int, n_group: int = 1,
                        topk_group: int = 1) -> int:
    """Most distinct expert ranks one token reaches: min(EP, k, the ranks its topk_group groups can span).

    DeepSeek-V3 on EP8 (256 experts in 8 groups, topk_group 4, top-8): each group on one rank, so at most 4."""
    per_rank, per_group = num_experts // expert_parallel, num_experts // n_group
    spans = sorted((len(_overlaps(lo, lo + per_group, per_rank, expert_parallel))
                    for lo in range(0, num_experts, per_group)), reverse=True)
    return min(expert_parallel, top_k, sum(spans[:topk_group]))


def _overlaps(lo: int, hi: int, size: int, count: int) -> list[int]:
    """Sizes of the non-empty overlaps of experts [lo, hi) with the `count` contiguous blocks of `size` experts."""
    out = [min(hi, (j + 1) * size) - max(lo, j * size) for j in range(lo // size, min(count, -(-hi // size)))]
    return [o for o in out if o > 0]


def expert_hit_fraction(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected fraction of the experts that `tokens` tokens route to (uniform routing, top-k each)."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


def allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of `nbytes` over `n` devices: 2 (n-1)/n of the data over each link, 2 log2 n latency steps."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2 * math.ceil(math.log2(n)) * latency


def layer_flops_per_token(cfg: ModelConfig, context: float, phase: str, layers: range | None = None
                          ) -> dict[str, float]:
    """FLOPs one token costs in one layer, by part, for the whole model replica (before any split); attention
    over the mean cached positions of `layers` (default: every layer; windowed layers cap them).

    Returns:
        dict with 'attention' (projections + scores), 'scores' (the part over cached positions), 'dense_ffn',
        'shared', 'router' and 'experts' (the token's top-X experts).
    """
    pc = param_counts(cfg)
    n, h = cfg.num_heads, cfg.head_dim
    if cfg.attention == "mla":
        if phase == "decode":
            hqk, hv = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
        else:
            hqk, hv = h + cfg.qk_rope_head_dim, cfg.v_head_dim or h
    else:
        hqk = hv = h
    scores = 2.0 * n * (hqk + hv) * cached_positions(cfg, context, layers)
    return {"attention": 2.0 * pc.attention + scores, "scores": scores, "dense_ffn": 2.0 * pc.dense_ffn,
            "shared": 2.0 * pc.shared, "router": 2.0 * pc.router,
            "experts": 2.0 * cfg.num_experts_per_tok * pc.expert}


def _collective(kind: str, msg: float, n: int, count: float, hw: Hardware, span: int) -> dict[str, float]:
    """Features of `count` collectives of `msg` bytes per device over `n` devices spanning `span` devices."""
    if n <= 1 or msg <= 0 or count <= 0:
        return {f"{kind}_{k}": 0.0 for k in ("count", "msg", "wire", "bw", "lat")} | {f"{kind}_bw": 1.0}
    bw, lat = hw.link(span)
    steps = math.ceil(math.log2(n))
    wire, steps = (2.0 * (n - 1) / n * msg, 2 * steps) if kind != "a2a" else (msg, steps)
    return {f"{kind}_count": count, f"{kind}_msg": msg, f"{kind}_wire": wire, f"{kind}_bw": bw,
            f"{kind}_lat": steps * lat}


def stage_features(cfg: ModelConfig, layout: PlanLayout | Layout | str, hw: Hardware, workload: Workload,
                   options: Options, stage: StageShape, load: Load) -> dict[str, float]:
    """The efficiency-free numbers of one microbatch through `stage` on one device (see module docstring)."""
    lay = PlanLayout.of(layout, options.expert_mode)
    cfg = stored_config(cfg, lay)  # the padded sizes the runtime stores and multiplies
    pc, wb, t, mt, e = param_counts(cfg), workload.weight_bytes, lay.tensor, lay.moe_tensor, lay.expert
    dec = layer_flops_per_token(cfg, load.decode_context, "decode", stage.layer_ids)
    pre = layer_flops_per_token(cfg, load.prefill_context, "prefill", stage.layer_ids)

    def group(name: str) -> float:
        return load.group_decode * dec[name] + load.group_prefill * pre[name]

    # Attention projections over TP (MLA's down-projections replicated), shared expert and dense FFNs over the
    # "shared_ffn" split, router replicated.
    latent = stage.layers * 2.0 * pc.attention_latent * load.group_tokens
    proj = (stage.layers * (group("attention") - group("scores")) - latent) / t + latent
    ffn = (stage.dense_layers * group("dense_ffn") + stage.moe_layers * group("shared")) / lay.shared_split
    weights = (stage.layers * ((pc.attention - pc.attention_latent) / t + pc.attention_latent)
               + (stage.dense_layers * pc.dense_ffn + stage.moe_layers * pc.shared) / lay.shared_split)
    matrices = stage.layers * (5 if cfg.attention == "mla" else 4) + 3 * (
        stage.moe_layers * (pc.shared > 0) + stage.dense_layers)
    router = stage.moe_layers * pc.router
    f = {"gemm_flops": proj + ffn + group("router") * stage.moe_layers,
         "gemm_bytes": weights * wb + router * 2.0, "gemm_rows": load.group_tokens}
    f["gemm_mat"] = f["gemm_bytes"] / max(1, matrices + stage.moe_layers)
    # LM head (last stage): logits of decode tokens and finishing prompts over the padded vocabulary, bf16.
    head = pc.embed / t * 2.0 if stage.last else 0.0
    f |= {"head_flops": load.logits * 2.0 * cfg.vocab_size * cfg.hidden_size / t if stage.last else 0.0,
          "head_bytes": head, "head_rows": load.logits if stage.last else 0.0}
    # Routed experts: the replica's tokens over MoE TP x EP.
    hit = expert_hit_fraction(cfg.num_experts, cfg.num_experts_per_tok, load.tokens)
    f |= {"moe_flops": stage.moe_layers * load.tokens * dec["experts"] / (mt * e),
          "moe_bytes": stage.moe_layers * (cfg.num_experts // e) * hit * pc.expert / mt * wb,
          "moe_rows": load.tokens * cfg.num_experts_per_tok / (cfg.num_experts * hit) if hit > 0 else 0.0,
          "moe_mat": pc.expert / 3 / mt * wb, "moe_width": cfg.moe_intermediate_size / mt}
    # Activation traffic (norms, residuals, QKV and attention outputs; MoE permute, expert intermediates,
    # activation, un-permute), read + write, memory-bound.
    d, ab, width = cfg.hidden_size, workload.act_bytes, cfg.moe_intermediate_size / mt
    attn_act = 8 * d + 3 * (cfg.num_heads * cfg.qk_head_dim + cfg.num_kv_heads * (
        cfg.qk_head_dim + cfg.value_head_dim)) / t
    routed = load.tokens * cfg.num_experts_per_tok / e
    f["act_bytes"] = ab * (stage.layers * load.group_tokens * attn_act
                           + stage.moe_layers * routed * (4 * d + 6 * width))
    kv_token = kv_bytes_per_token_layer(cfg, lay, workload)
    ids = stage.layer_ids
    positions = (load.group_decode * cached_positions(cfg, load.decode_context, ids)
                 + load.chunks * cached_positions(cfg, load.prefix, ids) + load.group_prefill)  # reads + writes
    scores = stage.layers * group("scores") / t
    context = (load.group_prefill * load.prefill_context + load.group_decode * load.decode_context) / max(
        load.group_tokens, 1e-9)
    f |= {"attn_flops": scores, "attn_ctx": context, "attn_bytes": stage.layers * positions * kv_token,
          "attn_kv": positions * kv_token,
          "imbalance": math.sqrt(2 * math.log(e) / (cfg.num_experts // e)) if e > 1 else 0.0}
    f |= _comm_features(cfg, lay, hw, workload, stage, load)
    f["kernels"] = (4 * stage.layers + (7 + 3 * (pc.shared > 0)) * stage.moe_layers + 4 * stage.dense_layers
                    + stage.first + 2 * stage.last)
    return f


def _comm_features(cfg: ModelConfig, lay: PlanLayout, hw: Hardware, workload: Workload, stage: StageShape,
                   load: Load) -> dict[str, float]:
    """The collectives of one microbatch through `stage` (module docstring), by kind (`COLLECTIVES`)."""
    _, y, z, w = lay.layout.split_factors  # tensor, tensor_expert, data_tensor, expert: one source, the runtime's
    t, e, g = lay.tensor, lay.expert, lay.group
    group_bytes = load.group_tokens * cfg.hidden_size * workload.act_bytes
    replicated = lay.replication > 1  # attention replicated over the expert group: the FFNs end on the whole group
    tp_count = stage.layers + (stage.dense_layers + stage.moe_layers) * (not replicated)
    out = _collective("tp", group_bytes, t, tp_count, hw, t)
    out |= _collective("moe", group_bytes, g, (stage.moe_layers + stage.dense_layers) * replicated, hw, g)
    out |= _collective("gather", z * group_bytes, z, stage.moe_layers, hw, t * z)
    exchange = w > 1 and not replicated  # tokens split over an expert axis: the all-to-all
    fanout = (expert_fanout(cfg.num_experts, cfg.num_experts_per_tok, e, cfg.n_group, cfg.topk_group)
              if exchange else 0.0)
    remote = fanout * (e - 1) / e  # the token's own rank is one of the e, hit as often as any other
    out |= _collective("a2a", group_bytes * remote * z / y, e, 2 * stage.moe_layers, hw, g)
    return out


def send_features(cfg: ModelConfig, layout: PlanLayout, hw: Hardware, workload: Workload, load: Load) -> dict:
    """One pipeline send per stage boundary per tick: a microbatch's [rows, T, D] activations. Activations are
    replicated over attention TP between layers, so every device of the group sends its whole copy."""
    if layout.stage == 1:
        return {"send_bytes": 0.0, "send_bw": 1.0, "send_lat": 0.0}
    bw, lat = hw.link(layout.group * layout.stage)
    return {"send_bytes": load.group_tokens * cfg.hidden_size * workload.act_bytes, "send_bw": bw, "send_lat": lat}


def sat(x, half):
    """x / (x + half): ~0 at x = 0, 1 for x >> half (1 when half = 0). x is floored by 1e-3 so that products of
    curves at x = 0 (idle operations) stay normal float32 numbers under XLA (their squares appear in gradients)."""
    return (x + 1e-3) / (x + half + 1e-3)


def op_times(f: dict, eff: dict, xp=np) -> dict:
    """Seconds per operation class for features `f` (arrays of any shape) and efficiency parameters `eff`.

    `f` also holds the device's `peak` (FLOP/s of the weights' compute precision), `peak_bf16`, `bandwidth`
    and `narrow` (1 for fp8/fp4 GEMMs). Works with NumPy or jax.numpy (`xp`); see the module docstring.
    """
    nar = 1.0 - f["narrow"] * (1.0 - eff["narrow"])
    nar_g = 1.0 - f["narrow"] * (1.0 - eff["narrow_grouped"])
    skew = 1.0 + eff["routing_skew"] * f["imbalance"]
    bw = f["bandwidth"] * eff["memory"]
    comp = {
        "gemm": f["gemm_flops"] / (f["peak"] * eff["compute"] * nar * sat(f["gemm_rows"], eff["compute_rows"])),
        "head": f["head_flops"] / (f["peak_bf16"] * eff["compute"] * sat(f["head_rows"], eff["compute_rows"])),
        "moe": skew * f["moe_flops"] / (f["peak"] * eff["grouped"] * nar_g * sat(f["moe_rows"], eff["grouped_rows"])
                                        * sat(f["moe_width"], eff["grouped_width"])),
        "attn": f["attn_flops"] / (f["peak_bf16"] * eff["attention"] * sat(f["attn_ctx"], eff["attention_context"])),
    }
    mem = {
        "act": f["act_bytes"] / bw,
        "gemm": f["gemm_bytes"] / (bw * sat(f["gemm_mat"], eff["memory_bytes"])),
        "head": f["head_bytes"] / (bw * sat(f["head_bytes"], eff["memory_bytes"])),
        "moe": f["moe_bytes"] / (bw * sat(f["moe_mat"], eff["memory_bytes"])),
        "attn": f["attn_bytes"] / (f["bandwidth"] * eff["attention_memory"] * sat(f["attn_kv"],
                                                                                    eff["attention_bytes"])),
    }
    comm = sum(f[f"{k}_count"] * ((skew if k == "a2a" else 1.0) * f[f"{k}_wire"] / (
        f[f"{k}_bw"] * eff["network"] * sat(f[f"{k}_msg"], eff["network_bytes"])) + f[f"{k}_lat"]
        + eff["collective_s"]) for k in COLLECTIVES)
    return {"compute": sum(comp.values()), "memory": sum(mem.values()),
            "roofline": sum(xp.maximum(comp[k], mem[k]) for k in comp) + mem["act"], "comm": comm,
            "kernels": f["kernels"] * eff["kernel_s"]}


def device_features(hw: Hardware, workload: Workload) -> dict[str, float]:
    """The device numbers `op_times` needs beside the stage's."""
    precision = hw.compute_precision(workload.precision)
    return {"peak": hw.peak_flops[precision], "peak_bf16": hw.peak_flops["bf16"], "bandwidth": hw.memory_bandwidth,
            "narrow": float(precision in ("fp8", "fp4"))}


def stage_comm_time(cfg: ModelConfig, layout: PlanLayout | Layout | str, hw: Hardware, workload: Workload,
                    options: Options, stage: StageShape, load: Load) -> tuple[float, float]:
    """(bytes one device sends, seconds) of the TP and expert-axis collectives of one microbatch through `stage`."""
    f = stage_features(cfg, layout, hw, workload, options, stage, load) | device_features(hw, workload)
    volume = sum(f[f"{k}_count"] * f[f"{k}_wire"] for k in COLLECTIVES)
    return volume, float(op_times(f, hw.efficiency.as_dict())["comm"])


def stage_cost(cfg: ModelConfig, layout: PlanLayout | Layout | str, hw: Hardware, workload: Workload,
               options: Options, stage: StageShape, load: Load) -> StageCost:
    """Cost of one microbatch `load` through `stage` on one device (see module docstring for the model)."""
    f = stage_features(cfg, layout, hw, workload, options, stage, load) | device_features(hw, workload)
    t = op_times(f, hw.efficiency.as_dict())
    return StageCost(
        flops=f["gemm_flops"] + f["head_flops"] + f["moe_flops"] + f["attn_flops"],
        bytes_read=f["gemm_bytes"] + f["head_bytes"] + f["moe_bytes"] + f["attn_bytes"],
        comm_bytes=sum(f[f"{k}_count"] * f[f"{k}_wire"] for k in COLLECTIVES),
        t_compute=float(t["compute"]), t_memory=float(t["memory"]), t_roofline=float(t["roofline"]),
        t_comm=float(t["comm"]), t_overhead=float(t["kernels"]), comm_overlap=options.comm_overlap)
