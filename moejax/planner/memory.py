"""Parameter counts and memory per device: weights by precision, KV cache, activation workspace.

Counting conventions (each a stated approximation, all < 0.1% of a model's parameters):
- Linear layers only, SwiGLU FFNs (3 matrices of D x F per expert, gpt-oss's clamped SwiGLU too), norms ignored,
  biases ignored: gpt-oss's expert biases (2 F + D per expert against 3 D F), router bias and attention sinks
  (one logit per head), attention biases, DeepSeek's routing correction bias (E per MoE layer) and Qwen2-MoE's
  shared-expert gate (D per MoE layer).
- GQA attention: q and o are D x (N H), k and v are D x (K H) (partial rotary changes no size).
- MLA attention (DeepSeek-V3): q = D x q_lora + q_lora x N (H + R) (or D x N (H + R) without q_lora),
  kv = D x (kv_lora + R) + kv_lora x N (H + Hv), o = N Hv x D, with H = qk_nope (head_dim), R = qk_rope_head_dim,
  Hv = v_head_dim.
- Router D x E per MoE layer (bf16), whatever its kind (softmax, grouped sigmoid, gpt-oss's top-k softmax: the
  same matrix). Shared expert 3 D Fs per MoE layer. Dense leading layers (`first_dense_layers`) 3 D Fd each, in
  place of the MoE block.
- Embedding V x D and LM head V x D (one table if tied) on *every* pipeline stage, split over `tensor`: the
  runtime keeps both on each stage (replicated over `stage`), though only the first embeds and the last
  computes logits.

KV cache (`kv_bytes_per_token_layer`): `ModelConfig.kv_bytes_per_token`, the one formula the runtime's pools
use (GQA 2 K H values per layer, MLA kv_lora + R; "fp8" / "int8" add a float32 scale per kv head of each pool,
MLA one), per layer and per device. The GQA cache splits over
`tensor` by kv heads, those fewer than TP replicated up to TP (a device holds max(K, TP) / TP heads); the MLA
latent is shared by all heads and is replicated over `tensor` (every TP rank holds all of it). A layer with a
sliding window (`ModelConfig.window_of`: every layer, or only `sliding_layers`) holds at most `sliding_window`
positions per request; the others hold the whole context (`cached_positions`).

Placement per device (the runtime's sharding rules, `moejax.sharding.RULES`, whose mesh axes a split layout
factors, `moejax.mesh.Layout.split_factors`, to the same counts): attention heads and vocabulary split over
attention TP, MLA's down-projections (the "latent" dim, `attention_latent_params`) replicated; the shared expert's
and the dense FFN layers' width over attention TP (times `expert` in the 'replicated_attention' mode,
`PlanLayout.shared_split`); experts over EP and their width over the MoE tensor factor (MTP); KV pages over
attention's data parallelism inside a group (`PlanLayout.attention_data`: the requests of the busiest group);
layers over `stage` (`Layout.stage_layers`: the first stages take the extra layers, the dense leading layers sit
in the first); nothing is split over `data`.

Stored sizes: per-device bytes (and the FLOPs of `moejax.planner.cost`) are counted on the sizes the runtime
stores (`stored_config`, from `moejax.model.transformer.Geometry`): the vocabulary padded to a multiple of TP,
the routed-expert width to a multiple of the MoE tensor factor, the shared expert's and the dense FFN's to one
of TP x EP, and KV heads fewer than TP replicated up to TP (their K and V projections included). The padding is
zeros, but it is stored, read and multiplied. Weights per device count the layer slots every stage stores
(`stored_stage`: each kind of layer stacked with the fullest stage's count); time and KV count the stage's own
layers. `param_counts(cfg)` stays the model's own count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.model.transformer import Geometry
from moejax.planner.layout import PlanLayout
from moejax.planner.workload import MXFP4_BLOCK, QUANTIZED, SCALE_BYTES, Options, Workload

GIB = 2**30


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one model by component (counts, not bytes)."""

    attention: int  # per layer
    expert: int  # one routed expert
    router: int  # per MoE layer
    shared: int  # shared expert(s) per MoE layer
    dense_ffn: int  # per dense leading layer
    embed: int
    unembed: int  # 0 if tied
    num_moe_layers: int
    num_dense_layers: int
    num_experts: int
    experts_per_token: int
    attention_latent: int = 0  # of `attention`: MLA's down-projections, replicated over tensor

    @property
    def total(self) -> int:
        moe = self.num_moe_layers * (self.attention + self.num_experts * self.expert + self.router + self.shared)
        dense = self.num_dense_layers * (self.attention + self.dense_ffn)
        return moe + dense + self.embed + self.unembed

    @property
    def active(self) -> int:
        """Parameters one token touches (top-X experts; embedding lookup counted as its D x V table)."""
        moe = self.num_moe_layers * (self.attention + self.experts_per_token * self.expert + self.router + self.shared)
        dense = self.num_dense_layers * (self.attention + self.dense_ffn)
        return moe + dense + self.embed + self.unembed


def attention_params(cfg: ModelConfig) -> int:
    """Linear-layer parameters of one attention block (GQA or MLA, see module docstring)."""
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if cfg.attention == "gqa":
        return 2 * d * n * h + 2 * d * cfg.num_kv_heads * h
    r, hv = cfg.qk_rope_head_dim, cfg.v_head_dim or h
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * n * (h + r) if cfg.q_lora_rank else d * n * (h + r)
    kv = d * (cfg.kv_lora_rank + r) + cfg.kv_lora_rank * n * (h + hv)
    return q + kv + n * hv * d


def attention_latent_params(cfg: ModelConfig) -> int:
    """The part of `attention_params` no head owns, so tensor parallelism replicates it (the runtime's "latent"
    dim): MLA's down-projections D x q_lora and D x (kv_lora + R); 0 for GQA."""
    if cfg.attention == "gqa":
        return 0
    return cfg.hidden_size * (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@functools.lru_cache(maxsize=64)
def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count the parameters of `cfg` by component."""
    d, v = cfg.hidden_size, cfg.vocab_size
    return ParamCounts(
        attention=attention_params(cfg),
        expert=3 * d * cfg.moe_intermediate_size,
        router=d * cfg.num_experts,
        shared=3 * d * cfg.shared_expert_intermediate_size,
        dense_ffn=3 * d * cfg.dense_intermediate_size,
        embed=v * d,
        unembed=0 if cfg.tie_word_embeddings else v * d,
        num_moe_layers=cfg.num_moe_layers,
        num_dense_layers=cfg.first_dense_layers,
        num_experts=cfg.num_experts,
        experts_per_token=cfg.num_experts_per_tok,
        attention_latent=attention_latent_params(cfg),
    )


@functools.lru_cache(maxsize=256)
def stored_config(cfg: ModelConfig, layout: Layout | PlanLayout) -> ModelConfig:
    """`cfg` with the sizes the runtime stores for `layout` (`Geometry.of`, its one source): vocabulary padded to
    a multiple of TP, routed-expert width to a multiple of the MoE tensor factor (TP for a runtime layout),
    shared-expert and dense-FFN widths to a multiple of TP x EP, KV heads fewer than TP replicated up to TP."""
    geo = Geometry.of(cfg, PlanLayout.of(layout).layout)  # a split layout's too: the runtime's own Layout
    return cfg.replace(vocab_size=geo.vocab, moe_intermediate_size=geo.ffn,
                       shared_expert_intermediate_size=geo.shared_ffn, num_kv_heads=geo.num_kv_heads,
                       dense_intermediate_size=geo.dense_ffn)


@dataclass(frozen=True)
class StageShape:
    """Which layers one pipeline stage holds: `layers` consecutive ones from layer `start`, the dense ones first."""

    index: int
    moe_layers: int
    dense_layers: int
    first: bool
    last: bool
    start: int = 0  # index of the stage's first layer in the model

    @property
    def layers(self) -> int:
        return self.moe_layers + self.dense_layers

    @property
    def layer_ids(self) -> range:
        return range(self.start, self.start + self.layers)


def stages(cfg: ModelConfig, layout: Layout) -> list[StageShape]:
    """The stages of `layout` for `cfg`, with the dense leading layers in the first stage(s)."""
    out, start = [], 0
    sizes = layout.stage_layers(cfg.num_layers)
    for i, n in enumerate(sizes):
        dense = max(0, min(start + n, cfg.first_dense_layers) - start)
        out.append(StageShape(i, n - dense, dense, first=i == 0, last=i == len(sizes) - 1, start=start))
        start += n
    return out


def stored_stage(cfg: ModelConfig, layout: Layout | PlanLayout) -> StageShape:
    """The layers every stage stores: the runtime stacks each kind of layer (dense, MoE) over `stage` with as many
    slots per stage as its fullest stage has (`moejax.model.transformer.Geometry`); slots past a stage's own
    layers hold zeros, skipped in compute but stored (DeepSeek-V3 over 4 stages: 3 dense + 15 MoE slots each)."""
    shapes = stages(cfg, layout)
    return StageShape(0, max(s.moe_layers for s in shapes), max(s.dense_layers for s in shapes), True, True)


def stage_weight_bytes(cfg: ModelConfig, layout: Layout | PlanLayout, workload: Workload, stage: StageShape) -> float:
    """Weight bytes one device of `stage` holds, padded sizes included (embedding and LM head on every stage, as
    the runtime does). A `Layout` is read in the 'dp_attention' mode; pass a `PlanLayout` for another.

    The runtime's post-training formats (`QUANTIZED`: int8, fp8, int4) are counted as `moejax.quant` stores them:
    values in their storage bytes plus every scale (`_scales_per_device`); MLA's kv up-projection stays in the
    serving dtype, as the router, embedding and LM head do."""
    layout = PlanLayout.of(layout)
    sized = stored_config(cfg, layout)
    pc, t = param_counts(sized), layout.tensor
    attention = stage.layers * ((pc.attention - pc.attention_latent) / t + pc.attention_latent)
    ffn = (stage.dense_layers * pc.dense_ffn + stage.moe_layers * pc.shared) / layout.shared_split
    experts = stage.moe_layers * (pc.num_experts // layout.expert) * pc.expert / layout.moe_tensor
    bf16 = stage.moe_layers * pc.router * 2.0 + (pc.embed + pc.unembed) / t * 2.0  # router replicated
    if workload.precision == "mxfp4":  # gpt-oss as published: the routed experts in MXFP4, the rest in bf16
        scales = _scales_per_device(sized, layout, stage, MXFP4_BLOCK, experts_only=True)
        return experts * 0.5 + scales * SCALE_BYTES + (attention + ffn) * 2.0 + bf16
    if workload.precision not in QUANTIZED:
        return (attention + ffn + experts) * workload.weight_bytes + bf16
    value_bytes, block = QUANTIZED[workload.precision]
    kv_up = stage.layers * _mla_kv_up_params(sized) / t  # over heads
    scales = _scales_per_device(sized, layout, stage, block)
    return (attention - kv_up + ffn + experts) * value_bytes + (kv_up + scales) * SCALE_BYTES + bf16


def _mla_kv_up_params(cfg: ModelConfig) -> int:
    """MLA's kv up-projection (kv_lora x N (H + Hv)) per layer, which the runtime keeps unquantized; 0 for GQA."""
    return cfg.kv_lora_rank * cfg.num_heads * (cfg.head_dim + cfg.value_head_dim) if cfg.attention == "mla" else 0


def _scales_per_device(cfg: ModelConfig, layout: PlanLayout, stage: StageShape, block: int | None,
                       experts_only: bool = False) -> float:
    """Scales of the quantized weights one device of `stage` holds (`cfg` at stored sizes), laid out as
    `moejax.model.layers.declare_weight` lays them out: one per output channel and block of the last contracted
    dim (`block` None: one block); output dims split like the weight's, a blocked dim's blocks like the dim, a
    single block replicated."""
    d, n, t = cfg.hidden_size, cfg.num_heads, layout.tensor

    def blocks(width: int, shards: int = 1) -> int:  # one device's blocks of a contracted dim split `shards` ways
        return width // block // shards if block and (width // shards) % block == 0 else 1

    def swiglu(width: int, shards: int) -> float:  # gate, up: per output column; down: per output row and block
        return 2 * width / shards * blocks(d) + d * blocks(width, shards) if width else 0.0

    if cfg.attention == "gqa":
        h = cfg.head_dim
        attention = (n + 2 * cfg.num_kv_heads) * h / t * blocks(d) + d * blocks(h)
    else:
        q, hqk = cfg.q_lora_rank, cfg.qk_head_dim
        query = q * blocks(d) + n * hqk / t * blocks(q) if q else n * hqk / t * blocks(d)
        attention = query + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * blocks(d) + d * blocks(cfg.value_head_dim)
    moe = (cfg.num_experts // layout.expert) * swiglu(cfg.moe_intermediate_size, layout.moe_tensor)
    if experts_only:
        return stage.moe_layers * moe
    shared = swiglu(cfg.shared_expert_intermediate_size, layout.shared_split)
    dense = swiglu(cfg.dense_intermediate_size, layout.shared_split)
    return stage.layers * attention + stage.moe_layers * (moe + shared) + stage.dense_layers * dense


def kv_bytes_per_token_layer(cfg: ModelConfig, layout: Layout | PlanLayout, workload: Workload) -> float:
    """KV-cache bytes one device stores per cached token per layer: `ModelConfig.kv_bytes_per_token` over the
    layers; GQA split over `tensor` by kv heads (replicated up to TP when fewer), MLA's latent replicated."""
    per_layer = cfg.kv_bytes_per_token(workload.kv_precision) / cfg.num_layers
    if cfg.attention == "mla":  # one latent for all heads: every TP rank holds it whole
        return per_layer
    return per_layer * layout.kv_heads_per_model(cfg) / cfg.num_kv_heads / layout.tensor


def windowed_layers(cfg: ModelConfig, layers: range) -> int:
    """How many of `layers` attend over a sliding window (`ModelConfig.window_of`)."""
    return _windowed_layers(cfg, layers) if cfg.sliding_window else 0  # the sweep's hot path: no hashing


@functools.lru_cache(maxsize=1024)
def _windowed_layers(cfg: ModelConfig, layers: range) -> int:
    return sum(cfg.window_of(i) is not None for i in layers)


def cached_positions(cfg: ModelConfig, context: float, layers: range | None = None) -> float:
    """Mean positions per layer of `layers` (default: every layer) that a request of `context` tokens keeps in
    cache: a windowed layer at most `sliding_window`, the others all `context`."""
    if not cfg.sliding_window:
        return context
    layers = range(cfg.num_layers) if layers is None else layers
    windowed = windowed_layers(cfg, layers)
    return context + windowed * (min(context, cfg.sliding_window) - context) / len(layers)


def stage_kv_bytes(cfg: ModelConfig, layout: Layout, workload: Workload, options: Options,
                   batch: int, stage: StageShape) -> float:
    """KV-cache bytes one device of `stage` holds for `batch` requests per replica at full context."""
    requests = math.ceil(batch / PlanLayout.of(layout, options.expert_mode).attention_data)  # busiest group's
    positions = cached_positions(cfg, workload.max_context, stage.layer_ids)
    return requests * positions * stage.layers * kv_bytes_per_token_layer(cfg, layout, workload)


def workspace_bytes(cfg: ModelConfig, layout: Layout, workload: Workload, options: Options,
                    batch: int, chunk: int) -> float:
    """Activation workspace of one device: the largest layer's live activations at a full step.

    A step carries one microbatch group's decode tokens plus a full prefill chunk, per attention group. Live at
    once: the residual stream and attention projections (2 D + N (2 Hqk + Hv) / TP per token, 2 D + 3 N H for
    GQA), the routed tokens' expert activations (X / EP of the replica's tokens, D + 2 F / MTP each, plus D each
    as dispatch buffers), and fp32 logits for the decode tokens (V / TP each).
    """
    plan = PlanLayout.of(layout, options.expert_mode)
    groups, sized = plan.attention_data, stored_config(cfg, plan)
    m = microbatches(layout, max(1, batch // groups), options)  # as the serving model caps it (an attention group's)
    tokens_group = batch / groups / m + chunk
    tokens_replica = tokens_group * groups
    t, d, ab = plan.tensor, cfg.hidden_size, workload.act_bytes
    attn = tokens_group * (2 * d + cfg.num_heads * (2 * cfg.qk_head_dim + cfg.value_head_dim) / t)
    ffn_width = max(sized.moe_intermediate_size, sized.dense_intermediate_size, sized.shared_expert_intermediate_size)
    routed = tokens_replica * cfg.num_experts_per_tok / plan.expert * (2 * d + 2 * ffn_width / plan.moe_tensor)
    logits = batch / groups / m * sized.vocab_size / t * 4.0
    return (attn + routed) * ab + logits


def microbatches(layout: Layout | PlanLayout, batch: int, options: Options) -> int:
    """Pipeline microbatch groups M: `options.microbatches` (the runtime's `ServeConfig.microbatches`), else one
    per stage; never more than `batch`, the requests of one attention group (what both callers pass)."""
    m = options.microbatches or layout.stage
    return max(1, min(m, int(batch)))


@dataclass(frozen=True)
class MemoryFit:
    """Bytes one device needs (the heaviest stage) against what it has."""

    weights: float
    kv_cache: float
    workspace: float
    reserved: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.workspace + self.reserved

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def reason(self) -> str:
        if self.fits:
            return ""
        return (f"needs {self.total / GIB:.1f} GiB per device > {self.capacity / GIB:.1f} GiB "
                f"(weights {self.weights / GIB:.1f}, KV {self.kv_cache / GIB:.1f}, "
                f"workspace {self.workspace / GIB:.1f}, reserved {self.reserved / GIB:.1f})")


def memory_fit(cfg: ModelConfig, layout: Layout, hw, workload: Workload, options: Options,
               batch: int, chunk: int) -> MemoryFit:
    """Memory per device for `batch` requests per replica and prefill chunk `chunk` (heaviest stage).

    Args:
        cfg: the model.
        layout: the parallel layout.
        hw: a `moejax.planner.hardware.Hardware`.
        workload: request shape and formats.
        options: modelling options (`expert_mode` decides whether the expert axis splits the KV cache).
        batch: concurrent requests per model replica (per `data` group).
        chunk: prefill tokens per step per attention group.
    """
    layout = PlanLayout.of(layout, options.expert_mode)
    weights = stage_weight_bytes(cfg, layout, workload, stored_stage(cfg, layout))  # the same on every stage
    kv = max(stage_kv_bytes(cfg, layout, workload, options, batch, s) for s in stages(cfg, layout))
    return MemoryFit(weights=weights, kv_cache=kv,
                     workspace=workspace_bytes(cfg, layout, workload, options, batch, chunk),
                     reserved=hw.reserved_memory_bytes, capacity=hw.memory_bytes)


def weights_per_device(cfg: ModelConfig, layout: Layout, workload: Workload) -> float:
    """Weight bytes on each device: the stored layers of a stage (`stored_stage`)."""
    return stage_weight_bytes(cfg, layout, workload, stored_stage(cfg, layout))
