"""First-principles cost of one forward step on one pipeline stage: compute, memory traffic, communication.

The unit is one *microbatch* passing through one *stage* on one device. The caller (`moejax.planner.serving`)
chooses the tokens in it and assembles stages and microbatches into pipeline rounds.

Time model (every assumption here is also in docs/planner.md):

    t_stage = max(t_compute, t_memory) + (1 - comm_overlap) * t_collectives + step_overhead_s
    t_compute = FLOPs / (peak(precision) * eff.compute)
    t_memory = bytes read / (memory_bandwidth * eff.memory)
    t_collective = volume / (link_bandwidth * eff.network) + steps * link_latency

- Compute and memory traffic overlap perfectly inside a stage (a roofline over the whole stage, not per kernel,
  which is optimistic when layers alternate between compute- and memory-bound).
- Collectives do not overlap compute unless `Options.comm_overlap` says so. Pipeline sends are separate
  (`send_time`) and are hidden when the pipeline is full.
- FLOPs: 2 per multiply-add. Linear layers cost 2 x params per token (MLA weight absorption is ignored: it
  changes the FLOPs of the projections by a few percent). Attention costs 2 N (Hqk + Hv) FLOPs per token
  per cached position it attends to; for MLA decode (absorbed) Hqk = kv_lora + R and Hv = kv_lora, for MLA
  prefill Hqk = H + R and Hv = v_head_dim.
- Memory: each microbatch reads the stage's non-expert weights once, and the experts it routes at least one
  token to: with n tokens choosing X of E experts uniformly, an expert is hit with probability
  1 - (1 - X/E)^n. Decode tokens read their request's whole KV cache; prefill chunks write their KV and read
  the prefix once per chunk. Activation traffic is ignored (small next to weights and KV).
- Communication per layer: two TP all-reduces (after attention and after the FFN/MoE) of the group's tokens
  (ring: 2 (t-1)/t x bytes, 2 ceil(log2 t) latency steps). With `ep_attention='data'`, each MoE layer does an
  all-to-all dispatch and a combine: every token goes to the distinct remote expert ranks its top-X experts
  live on (the top-k fan-out, `expert_fanout`), D values each way. With `ep_attention='replicated'` the MoE
  block's all-reduce spans tensor x expert (it finishes the TP FFN and combines the experts in one
  collective, as the runtime does) in place of the FFN's TP all-reduce. A collective whose group fits one
  NVLink domain uses NVLink, otherwise the scale-out network (`Hardware.link`); groups are placed tensor
  innermost, then expert, then stage, then data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.hardware import Hardware
from moejax.planner.memory import StageShape, cached_positions, kv_bytes_per_token_layer, param_counts
from moejax.planner.workload import Options, Workload


@dataclass(frozen=True)
class Load:
    """Tokens of one microbatch: the replica's totals (what the MoE blocks see) and the busiest attention group's.

    With `ep_attention='replicated'` there is one attention group and both views agree.

    Attributes:
        decode: decode tokens in the replica (one per decoding request).
        prefill: prefill tokens in the replica.
        group_decode: decode tokens of the busiest attention group.
        group_prefill: prefill tokens of the busiest attention group.
        logits: tokens of the busiest group that need logits (decode tokens and finishing prompts).
        chunks: prefill chunks of the busiest group (each reads its prefix of the KV cache once).
        decode_context: mean cached positions a decode token attends to.
        prefill_context: mean positions a prefill token attends to (causal: about half the prompt).
        prefix: mean prefix length of the chunks.
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
    """Per-device cost of one microbatch through one stage. Times in seconds, volumes in FLOPs and bytes."""

    flops: float
    bytes_read: float
    comm_bytes: float
    t_compute: float
    t_memory: float
    t_comm: float
    t_overhead: float
    comm_overlap: float = 0.0

    @property
    def time(self) -> float:
        return max(self.t_compute, self.t_memory) + (1.0 - self.comm_overlap) * self.t_comm + self.t_overhead


def expert_fanout(num_experts: int, top_k: int, expert_parallel: int) -> float:
    """Expected number of distinct expert ranks a token's top-k experts live on (uniform routing).

    Rank r holds E / EP experts; it is missed when all k choices fall among the other E - E/EP experts.
    """
    per_rank = num_experts // expert_parallel
    miss = math.comb(num_experts - per_rank, top_k) / math.comb(num_experts, top_k)
    return expert_parallel * (1.0 - miss)


def allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of `nbytes` over `n` devices: 2 (n-1)/n of the data over each link, 2 log2 n latency steps."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2 * math.ceil(math.log2(n)) * latency


def alltoall_time(nbytes_per_device: float, n: int, bandwidth: float, latency: float) -> float:
    """All-to-all in which each device sends `nbytes_per_device` to the others: bytes over its link, log2 n steps."""
    if n <= 1 or nbytes_per_device <= 0:
        return 0.0
    return nbytes_per_device / bandwidth + math.ceil(math.log2(n)) * latency


def layer_flops_per_token(cfg: ModelConfig, context: float, phase: str) -> dict[str, float]:
    """FLOPs one token costs in one layer, by part, for the whole model replica (before any split).

    Args:
        cfg: the model.
        context: cached positions the token attends to.
        phase: 'decode' or 'prefill' (only MLA attention differs, see module docstring).

    Returns:
        dict with 'attention' (projections + scores), 'dense_ffn', 'shared', 'router' and 'experts'
        (the token's top-X experts).
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
    positions = cached_positions(cfg, context)
    return {
        "attention": 2.0 * pc.attention + 2.0 * n * (hqk + hv) * positions,
        "dense_ffn": 2.0 * pc.dense_ffn,
        "shared": 2.0 * pc.shared,
        "router": 2.0 * pc.router,
        "experts": 2.0 * cfg.num_experts_per_tok * pc.expert,
    }


def stage_flops(cfg: ModelConfig, layout: Layout, stage: StageShape, load: Load) -> float:
    """FLOPs one device of `stage` performs for one microbatch.

    Attention, dense and shared-expert FFNs and the LM head work on the busiest attention group's tokens, split
    over `tensor`; routed experts on the replica's tokens, split over `tensor` x `expert`.
    """
    t, e = layout.tensor, layout.expert
    dec = layer_flops_per_token(cfg, load.decode_context, "decode")
    pre = layer_flops_per_token(cfg, load.prefill_context, "prefill")

    def group(name: str) -> float:
        return (load.group_decode * dec[name] + load.group_prefill * pre[name]) / t

    flops = stage.layers * group("attention") + stage.dense_layers * group("dense_ffn")
    flops += stage.moe_layers * (group("shared") + group("router") * t + load.tokens * dec["experts"] / (t * e))
    if stage.last:
        flops += load.logits * 2.0 * cfg.vocab_size * cfg.hidden_size / t
    return flops


def stage_bytes(cfg: ModelConfig, layout: Layout, workload: Workload, stage: StageShape, load: Load) -> float:
    """Bytes one device of `stage` reads from memory for one microbatch (weights touched + KV cache)."""
    pc, t, wb = param_counts(cfg), layout.tensor, workload.weight_bytes
    linear = stage.layers * pc.attention + stage.moe_layers * pc.shared + stage.dense_layers * pc.dense_ffn
    hit = 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.num_experts) ** load.tokens
    experts = stage.moe_layers * (cfg.num_experts // layout.expert) * hit * pc.expert
    weights = (linear + experts) / t * wb + stage.moe_layers * pc.router * 2.0
    if stage.last:
        weights += pc.embed / t * 2.0  # LM head (the embedding lookup reads only the tokens' rows)
    kv_token = kv_bytes_per_token_layer(cfg, layout, workload) * stage.layers
    positions = (load.group_decode * cached_positions(cfg, load.decode_context)
                 + load.chunks * cached_positions(cfg, load.prefix) + load.group_prefill)  # reads + prefill writes
    return weights + positions * kv_token


def stage_comm_time(cfg: ModelConfig, layout: Layout, hw: Hardware, workload: Workload, options: Options,
                    stage: StageShape, load: Load) -> tuple[float, float]:
    """(bytes sent, seconds) of the TP and EP collectives one device performs for one microbatch."""
    t, e = layout.tensor, layout.expert
    bw_t, lat_t = hw.link(t)
    bw_e, lat_e = hw.link(t * e)
    bw_t, bw_e = bw_t * hw.efficiency.network, bw_e * hw.efficiency.network
    token_bytes = cfg.hidden_size * workload.act_bytes
    group_bytes = load.group_tokens * token_bytes
    tp_bytes = 2.0 * (t - 1) / t * group_bytes if t > 1 else 0.0
    volume = 2 * stage.layers * tp_bytes
    seconds = 2 * stage.layers * allreduce_time(group_bytes, t, bw_t, lat_t)
    if e > 1 and stage.moe_layers:
        if options.ep_attention == "data":
            remote = expert_fanout(cfg.num_experts, cfg.num_experts_per_tok, e) * (e - 1) / e
            a2a_bytes = group_bytes * remote
            volume += stage.moe_layers * 2 * a2a_bytes
            seconds += stage.moe_layers * 2 * alltoall_time(a2a_bytes, e, bw_e, lat_e)
        else:
            # The MoE block's all-reduce spans tensor x expert (it finishes the tensor-parallel FFN and
            # combines the experts at once, as the runtime does) instead of the FFN's TP all-reduce.
            volume += stage.moe_layers * (2.0 * (t * e - 1) / (t * e) * group_bytes - tp_bytes)
            seconds += stage.moe_layers * (allreduce_time(group_bytes, t * e, bw_e, lat_e)
                                           - allreduce_time(group_bytes, t, bw_t, lat_t))
    return volume, seconds


def send_time(cfg: ModelConfig, layout: Layout, hw: Hardware, workload: Workload, load: Load) -> float:
    """Seconds to pass one microbatch's activations to the next stage (each TP rank sends 1/TP of them)."""
    if layout.stage == 1:
        return 0.0
    bw, lat = hw.link(layout.tensor * layout.expert * layout.stage)
    nbytes = load.group_tokens * cfg.hidden_size * workload.act_bytes / layout.tensor
    return nbytes / (bw * hw.efficiency.network) + lat


def stage_cost(cfg: ModelConfig, layout: Layout, hw: Hardware, workload: Workload, options: Options,
               stage: StageShape, load: Load) -> StageCost:
    """Cost of one microbatch `load` through `stage` on one device (see module docstring for the model).

    Args:
        cfg: the model.
        layout: the parallel layout (the data factor plays no part: replicas are independent).
        hw: hardware with its efficiency factors.
        workload: formats and request shape.
        options: modelling options.
        stage: which layers the device holds.
        load: tokens of one microbatch of one replica.
    """
    eff = hw.efficiency
    flops = stage_flops(cfg, layout, stage, load)
    nbytes = stage_bytes(cfg, layout, workload, stage, load)
    comm_bytes, t_comm = stage_comm_time(cfg, layout, hw, workload, options, stage, load)
    return StageCost(
        flops=flops, bytes_read=nbytes, comm_bytes=comm_bytes,
        t_compute=flops / (hw.peak(workload.precision) * eff.compute),
        t_memory=nbytes / (hw.memory_bandwidth * eff.memory),
        t_comm=t_comm, t_overhead=eff.step_overhead_s, comm_overlap=options.comm_overlap,
    )
