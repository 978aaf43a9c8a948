"""What is being served, and the modelling choices that are not properties of the model or the hardware.

`Workload` fixes the request shape and the number formats; `Options` holds the assumptions a researcher may
want to flip (how the expert axis treats attention, pipeline microbatches, communication overlap). Both are
frozen and carried unchanged through memory fit, cost model and sweep.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from moejax.config import KV_FORMATS
from moejax.sharding import expert_mode_of  # one name shared with the runtime

# Bytes per weight, block scales included (the cost model's bytes read per weight):
#   fp8: e4m3 values with one fp32 scale per 128x128 block (DeepSeek-V3 style) -> 1 + 4 / 16384.
#   fp4: NVFP4, e2m1 values with one e4m3 scale per 16 values (the per-tensor fp32 scale is negligible)
#        -> 0.5 + 1 / 16.
#   int8: the runtime's post-training int8 (`moejax.quant`), one bf16 scale per output channel (under 0.1% for
#        contracted widths >= 2048: not counted) -> 1.
#   int4: the runtime's int4, one bf16 scale per block of 128 along the contracted dim -> 0.5 + 2 / 128.
#   The runtime's post-training "fp8" (per output channel) is within 0.1% of the block-scaled figure.
#   mxfp4: gpt-oss as published, e2m1 routed experts with one E8M0 scale per 32 values, the rest bf16 (the
#        memory model counts that split; the cost model reads every linear weight at the experts' bytes).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128), "fp4": 0.5 + 1.0 / 16, "int8": 1.0,
                "int4": 0.5 + 2.0 / 128, "mxfp4": 0.5 + 1.0 / 32}
MXFP4_BLOCK = 32
# The runtime's post-training formats (`moejax.quant.SCHEMES`), counted exactly by the memory model
# (`moejax.planner.memory.stage_weight_bytes`): precision -> (bytes of one stored value, block along the last
# contracted dim that one scale covers, None: one scale per output channel). Scales are in the serving dtype
# (`SCALE_BYTES`, bf16); a contracted dim whose shard is not a multiple of the block has one block. int4 values
# take half a byte in device memory: XLA packs them two to a byte (measured on XLA:CPU as the process's resident
# memory; `nbytes` and `on_device_size_in_bytes()` report a byte per value).
QUANTIZED = {"int8": (1.0, None), "fp8": (1.0, None), "int4": (0.5, 128)}
SCALE_BYTES = 2.0
# KV cache formats: the runtime's names (`moejax.config.KV_FORMATS`); bytes per value here, and the quantized ones'
# float32 scale per (token, kv head) (MLA: per token) counted by `ModelConfig.kv_bytes_per_token`, the one formula.
KV_BYTES = {name: float(value_bytes) for name, (value_bytes, _) in KV_FORMATS.items()}


@dataclass(frozen=True)
class Workload:
    """Request shape and number formats.

    Attributes:
        isl: input (prompt) tokens per request.
        osl: output tokens per request (the first comes out of prefill, the other osl - 1 out of decode steps).
        precision: format of the linear-layer weights (attention, experts, shared and dense FFN). Embeddings,
            the LM head, norms and the router stay bf16.
        kv_precision: format of the KV cache (`KV_BYTES`: "fp8" and "int8" are the runtime's quantized caches,
            scales included).
        act_bytes: bytes per activation value on the wire and in workspace (bf16).
        arrival_rate: None: closed loop at the configuration's concurrency (`batch_size`); else Poisson arrivals
            at this many requests/s over all replicas, queueing for prefill (M/D/1, `moejax.planner.serving`).
        prefix_hit_rate: fraction h in [0, 1) of prompt tokens served from the prefix cache (the runtime's
            `enable_prefix_caching`): prefill computes the other (1 - h) isl tokens (`prefill_tokens`), which still
            attend over the whole prompt; the cached tokens still occupy the KV cache.
    """

    isl: int = 1024
    osl: int = 256
    precision: str = "bf16"
    kv_precision: str = "bf16"
    act_bytes: float = 2.0
    arrival_rate: float | None = None
    prefix_hit_rate: float = 0.0

    def __post_init__(self):
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"isl and osl must be >= 1, got isl={self.isl}, osl={self.osl}")
        if self.precision not in WEIGHT_BYTES:
            raise ValueError(f"unknown weight precision {self.precision!r}; known {sorted(WEIGHT_BYTES)}")
        if self.kv_precision not in KV_BYTES:
            raise ValueError(f"unknown kv precision {self.kv_precision!r}; known {sorted(KV_BYTES)}")
        if self.arrival_rate is not None and not self.arrival_rate > 0:
            raise ValueError(f"arrival_rate must be > 0 requests/s (or None), got {self.arrival_rate!r}")
        h = self.prefix_hit_rate
        if isinstance(h, bool) or not isinstance(h, numbers.Real) or not 0.0 <= h < 1.0:
            raise ValueError(f"prefix_hit_rate must be a number in [0, 1) (the fraction of prompt tokens served "
                             f"from the prefix cache), got {h!r}")

    @property
    def weight_bytes(self) -> float:
        return WEIGHT_BYTES[self.precision]

    @property
    def kv_bytes(self) -> float:
        """Bytes per KV value (scales not included: `ModelConfig.kv_bytes_per_token(kv_precision)` counts them)."""
        return KV_BYTES[self.kv_precision]

    @property
    def prefill_tokens(self) -> float:
        """Prompt tokens prefill computes per request: (1 - prefix_hit_rate) x isl (a fluid mean), at least the
        last one, whose logits give the first output token. isl exactly when nothing is cached."""
        return max(1.0, self.isl * (1.0 - self.prefix_hit_rate))

    @property
    def cached_tokens(self) -> float:
        """Prompt tokens per request served from the prefix cache: the first isl - `prefill_tokens`."""
        return self.isl - self.prefill_tokens

    @property
    def max_context(self) -> int:
        return self.isl + self.osl


@dataclass(frozen=True)
class Options:
    """Modelling assumptions (see docs/planner.md).

    Attributes:
        expert_mode: what the expert axis does outside the MoE blocks.
            'dp_attention' (default; DeepSeek-V3 / wide-EP serving): attention, dense and shared-expert layers are
            data-parallel over the expert axis (each expert rank serves its own requests and holds their KV
            cache); MoE blocks exchange tokens with an all-to-all dispatch and combine.
            'replicated_attention' (the runtime's other mode, `moejax.sharding.RULES`): every expert rank runs the same
            attention on the same tokens; each computes its own experts and an all-reduce over the expert axis
            combines them. The earlier names 'data' / 'replicated' are accepted for one release (DeprecationWarning).
        microbatches: pipeline microbatch groups M (the runtime's `ServeConfig.microbatches`); None: as many as
            stages (capped by the requests of an attention group).
        comm_overlap: fraction of TP/EP collective time hidden behind compute and memory traffic (0: none).
    """

    expert_mode: str = "dp_attention"
    microbatches: int | None = None
    comm_overlap: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "expert_mode", expert_mode_of(self.expert_mode))
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")
        if not 0.0 <= self.comm_overlap <= 1.0:
            raise ValueError(f"comm_overlap must lie in [0, 1], got {self.comm_overlap}")

