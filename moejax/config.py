"""Model and serving configuration: frozen dataclasses loaded from YAML or a Hugging Face config.json.

`ModelConfig` describes an MoE transformer in one vocabulary shared by the runtime and the planner.
The runtime implements the Mixtral, Qwen2-MoE and Qwen3-MoE families; the planner also reads the
fields that describe structure the runtime does not run yet (dense leading layers, MLA attention),
and `ModelConfig.check_runtime_support` rejects those with a clear error before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "glm4_moe", "olmoe", "gpt_oss",
            "gpt_moe")
RUNTIME_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "glm4_moe", "olmoe",
                    "gpt_oss")
ROUTERS = ("softmax", "sigmoid", "topk_softmax")  # `moejax.model.router`
ROPE_TYPES = ("default", "yarn", "linear")  # `moejax.model.rope`
EXPERT_ACTIVATIONS = ("silu", "swiglu_clamped")  # `moejax.model.moe`
QUANTIZATIONS = ("int8", "fp8", "int4")  # post-training weight quantization at load (`moejax.quant`)
# quantized checkpoints the loader reads as stored (`moejax.checkpoint.quantized`; quantization_config.quant_method)
CHECKPOINT_QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors")
SERVING_DTYPES = ("float32", "bfloat16", "float16")  # what a model computes in (`moejax.load(dtype=...)`)
KV_CACHE_DTYPES = ("fp8", "int8")  # quantized KV cache (`ServeConfig.kv_cache_dtype`; None: the serving dtype)
# KV cache formats by name (the runtime's and the planner's): (bytes per value, bytes per scale). A quantized pool
# holds 1-byte values (fp8: float8_e4m3fn) and one float32 scale per (token, kv head) (MLA: per token of its latent
# pool) beside them (`moejax.kv_cache`).
KV_FORMATS = {"fp32": (4, 0), "bf16": (2, 0), "fp8": (1, 4), "int8": (1, 4)}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of an MoE transformer: every field that changes the math, in one vocabulary shared by
    the runtime, the checkpoint loader and the planner.

    Dimension letters (see `moejax.model`): V vocab, D width, L layers, N query heads, K kv heads,
    H head dim, F routed-expert FFN width, E experts, X experts per token. MLA (`attention="mla"`): H is
    qk_nope_head_dim, the query/key width without the decoupled rope part (qk_rope_head_dim).
    """

    family: str
    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    moe_intermediate_size: int  # F, per routed expert
    num_experts: int  # E
    num_experts_per_tok: int  # X
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w)
    qk_norm: bool = False  # RMSNorm on q and k: per head (Qwen3, GLM) or over the whole projected width (OLMoE)
    qk_norm_scope: str = "head"  # "head" | "all" (OLMoE: one norm over the N x H / K x H projection)
    qkv_bias: bool = False  # GQA: q/k/v biases; MLA: q_a / kv_a biases (attention_bias)
    o_bias: bool = False
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip] (q and k after their norms)
    attention_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn" | "linear" (Hugging Face's rope_parameters)
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 0  # YaRN: the pre-training context
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0  # YaRN (DeepSeek): 0 for none
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float = 0.0  # YaRN: 0 derives it from factor / mscale (as Hugging Face does)
    rope_truncate: bool = True  # YaRN: round the correction range (gpt-oss: false)
    rope_interleave: bool = False  # DeepSeek MLA: rotary pairs (x0, x1), (x2, x3)... instead of halves
    partial_rotary_factor: float = 1.0  # GLM: the first head_dim x factor dims are rotated, the rest pass
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # layers that use `sliding_window` (None: every layer)
    # Routing (`moejax.model.router`)
    router: str = "softmax"  # "softmax" (then top-k) | "sigmoid" (grouped, bias-corrected) | "topk_softmax"
    router_bias: bool = False  # gpt-oss: a bias on the router logits
    n_group: int = 1  # experts in n_group groups, tokens choose topk_group groups first (DeepSeek-V2/V3, GLM)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Expert FFN
    expert_activation: str = "silu"  # "silu" (SwiGLU) | "swiglu_clamped" (gpt-oss)
    swiglu_alpha: float = 1.702  # swiglu_clamped: gate * sigmoid(alpha gate) * (up + 1), clamped to `swiglu_limit`
    swiglu_limit: float = 7.0
    expert_bias: bool = False  # gpt-oss: biases on the experts' gate, up and down projections
    # Layers with a dense FFN before the MoE layers (DeepSeek-V3, GLM-4.5)
    first_dense_layers: int = 0
    dense_intermediate_size: int = 0  # FFN width of those dense layers
    attention: str = "gqa"  # "gqa" | "mla"
    kv_lora_rank: int = 0  # MLA: compressed KV width cached per token per layer
    q_lora_rank: int = 0  # MLA: compressed query width (0: no query compression)
    qk_rope_head_dim: int = 0  # MLA: decoupled RoPE key width cached per token per layer
    v_head_dim: int = 0  # MLA: value head dim (0: head_dim)
    # The checkpoint's own dtype, as config.json's torch_dtype / dtype names it (a moejax checkpoint: its stored
    # dtype; none declared: float32). What `dtype="auto"` serves in (`serving_dtype`); it changes no shape.
    dtype: str = "float32"
    name: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        for field, allowed in (("attention", ("gqa", "mla")), ("router", ROUTERS), ("rope_type", ROPE_TYPES),
                               ("expert_activation", EXPERT_ACTIVATIONS), ("qk_norm_scope", ("head", "all"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.rotary_dim % 2 or self.rotary_dim < 2:  # RoPE rotates pairs of dimensions
            what = ("ModelConfig.qk_rope_head_dim" if self.attention == "mla" else "ModelConfig.head_dim"
                    if self.partial_rotary_factor == 1 else "head_dim x partial_rotary_factor")
            raise ValueError(f"{what} must be even (rotary embeddings rotate pairs of dimensions), got "
                             f"{self.rotary_dim}")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers}) must lie in [0, {self.num_layers}]")
        if self.first_dense_layers and self.dense_intermediate_size < 1:
            raise ValueError(f"first_dense_layers={self.first_dense_layers} needs dense_intermediate_size >= 1")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}) and topk_group "
                             f"({self.topk_group}) lie in [1, n_group]")
        if self.n_group > 1 and self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError(f"topk_group ({self.topk_group}) groups of {self.num_experts // self.n_group} experts "
                             f"hold fewer than num_experts_per_tok ({self.num_experts_per_tok})")
        if self.sliding_layers is not None:
            if not isinstance(self.sliding_layers, tuple):  # YAML gives a list: keep the config hashable
                object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
            bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"sliding_layers {bad} outside [0, {self.num_layers})")
        if self.attention == "mla" and (self.kv_lora_rank < 1 or self.qk_rope_head_dim < 1):
            raise ValueError("MLA needs kv_lora_rank >= 1 and qk_rope_head_dim >= 1")
        if not isinstance(self.dtype, str) or not self.dtype:
            raise ValueError(f"ModelConfig.dtype must be a dtype name (e.g. 'bfloat16'), got {self.dtype!r}")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def rotary_dim(self) -> int:
        """Dims of each query/key head that RoPE rotates."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        """Width of a query (and key) head: head_dim, plus the decoupled rope part for MLA."""
        return self.head_dim + (self.qk_rope_head_dim if self.attention == "mla" else 0)

    @property
    def value_head_dim(self) -> int:
        return (self.v_head_dim or self.head_dim) if self.attention == "mla" else self.head_dim

    @property
    def serving_dtype(self) -> str:
        """The dtype `dtype="auto"` serves in (one of `SERVING_DTYPES`): the checkpoint's own; bfloat16 for a
        narrow storage type (float8 / int8 / 4-bit: a quantized checkpoint's values, computed in bfloat16 as vLLM
        and transformers serve them); float32 for float64. ValueError for any other name: pass a dtype."""
        name = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if name in SERVING_DTYPES:
            return name
        if name.startswith(("float8", "float4", "int8", "uint8", "int4")):
            return "bfloat16"
        raise ValueError(f"model {self.name or self.family} declares dtype {self.dtype!r} (config.json torch_dtype), "
                         f"which moejax does not serve in; pass a dtype explicitly (--dtype / dtype=), one of "
                         f"{', '.join(SERVING_DTYPES)}")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full attention)."""
        if self.sliding_window and (self.sliding_layers is None or layer in self.sliding_layers):
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, kv_format: str | float) -> float:
        """Bytes the KV cache holds per token, all layers: the one formula (runtime pools and planner agree with it).

        GQA: a key and a value of head_dim per kv head; MLA: the compressed latent (kv_lora_rank) and the
        decoupled rope key (qk_rope_head_dim), shared by all heads. `kv_format`: a name of `KV_FORMATS` (a
        quantized one adds a float32 scale per kv head of each pool, MLA one per token), or the bytes per value
        of a float cache."""
        if isinstance(kv_format, str):
            if kv_format not in KV_FORMATS:
                raise ValueError(f"unknown KV cache format {kv_format!r}; choose from {sorted(KV_FORMATS)}")
            value_bytes, scale_bytes = KV_FORMATS[kv_format]
        else:
            value_bytes, scale_bytes = kv_format, 0
        values, scales = ((self.kv_lora_rank + self.qk_rope_head_dim, 1) if self.attention == "mla"
                          else (2 * self.num_kv_heads * self.head_dim, 2 * self.num_kv_heads))
        return (values * value_bytes + scales * scale_bytes) * self.num_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def check_runtime_support(self) -> None:
        """Raise ValueError naming every feature the runtime model does not implement."""
        problems = []
        if self.family not in RUNTIME_FAMILIES:
            problems.append(f"family {self.family!r} is planner-only (runtime families: {RUNTIME_FAMILIES})")
        if problems:
            raise ValueError(f"model {self.name or self.family} cannot run in moejax yet: " + "; ".join(problems))

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """Translate a Hugging Face config.json dict. Every field that changes the math is read or refused by name
        (`_HF_FAMILIES` holds one translator per model_type; `_refuse_unsupported` the fields no family runs)."""
        model_type = hf.get("model_type")
        if model_type in _UNSUPPORTED_TYPES:
            raise ValueError(f"Hugging Face model_type {model_type!r} is not supported: "
                             f"{_UNSUPPORTED_TYPES[model_type]}; supported: {tuple(_HF_FAMILIES)}")
        if model_type not in _HF_FAMILIES:
            raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: "
                             f"{tuple(_HF_FAMILIES)}")
        _refuse_unsupported(hf)
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        common = dict(
            name=name or hf.get("_name_or_path", "") or model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            num_experts_per_tok=hf["num_experts_per_tok"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            dtype=_hf_dtype(hf),
            **_hf_rope(hf),
        )
        return cls(**{**common, **_HF_FAMILIES[model_type](hf)})


# ---- Hugging Face config.json translation, one function per model_type --------------------------


def _hf_dtype(hf: dict[str, Any]) -> str:
    """config.json's dtype as torch names it: `dtype` (transformers >= 4.56) or `torch_dtype`; float32 when it
    declares none (transformers' own default). Mapped to a serving dtype only when asked (`serving_dtype`)."""
    value = hf.get("dtype") or hf.get("torch_dtype")
    name = str(value).removeprefix("torch.") if value else "float32"
    return "float32" if name == "auto" else name


# torch's other names for the serving dtypes, and float64 (served in float32, as the widest moejax runs)
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float32", "float64": "float32",
                  "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _hf_rope(hf: dict[str, Any]) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    out = dict(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_type=rope_type,
               partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))))
    if rope_type == "linear":
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "yarn":
        original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        if not original:
            raise ValueError("YaRN rope_parameters need original_max_position_embeddings")
        factor = rope.get("factor") or hf["max_position_embeddings"] / original
        out |= dict(rope_factor=float(factor), rope_original_max_position_embeddings=int(original),
                    rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                    rope_mscale=float(rope.get("mscale") or 0),
                    rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
                    rope_attention_factor=float(rope.get("attention_factor") or 0),
                    rope_truncate=bool(rope.get("truncate", True)))
    return out


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    """Fields no runtime family implements, refused by name (they would load silently wrong)."""
    qc = hf.get("quantization_config")
    if qc:  # how the weights are stored, read by `moejax.checkpoint.quantized`; other methods are refused here
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        if method not in CHECKPOINT_QUANT_METHODS:
            raise ValueError(f"quantization_config (quant_method {method!r}) is not supported: the loader reads "
                             f"{', '.join(CHECKPOINT_QUANT_METHODS)} quantized checkpoints and float ones "
                             f"(F32/F16/BF16)")
    act = hf.get("hidden_act", "silu")
    if hf.get("model_type") != "gpt_oss" and act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")


def _sliding(hf: dict[str, Any], use_window: bool) -> dict[str, Any]:
    """The sliding window and the layers it applies to, from `layer_types` when the config has them."""
    window = hf.get("sliding_window") if use_window else None
    types = hf.get("layer_types")
    if not window:
        if types and "sliding_attention" in types:
            raise ValueError("layer_types names sliding_attention layers but the config has no sliding window")
        return dict(sliding_window=None)
    if not types:
        return dict(sliding_window=int(window))
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (only sliding_attention and full_attention)")
    if len(types) != hf["num_hidden_layers"]:
        raise ValueError(f"layer_types has {len(types)} entries for {hf['num_hidden_layers']} layers")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return dict(sliding_window=int(window), sliding_layers=None if len(sliding) == len(types) else sliding)


def _num_experts(hf) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):  # each family's own name, as saved
        if hf.get(key):
            return hf[key]
    raise KeyError("num_local_experts")


def _mixtral(hf):
    return dict(family="mixtral", moe_intermediate_size=hf["intermediate_size"], num_experts=_num_experts(hf),
                norm_topk_prob=True, **_sliding(hf, True))


def _qwen_moe(hf):
    model_type = hf["model_type"]
    if hf.get("mlp_only_layers"):
        raise ValueError(f"mlp_only_layers={hf['mlp_only_layers']} (dense FFN layers among the MoE layers) is not "
                         f"supported")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"decoder_sparse_step={hf['decoder_sparse_step']} (MoE every few layers) is not supported "
                         f"(only 1)")
    shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
    return dict(family=model_type, moe_intermediate_size=hf["moe_intermediate_size"], num_experts=_num_experts(hf),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), shared_expert_intermediate_size=shared,
                shared_expert_gate=bool(shared), qk_norm=model_type == "qwen3_moe",
                qkv_bias=(bool(hf.get("qkv_bias", True)) if model_type == "qwen2_moe"
                          else bool(hf.get("attention_bias"))),
                o_bias=model_type == "qwen3_moe" and bool(hf.get("attention_bias")),
                **_sliding(hf, bool(hf.get("use_sliding_window", False))))


def _grouped_routing(hf) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 routing and layer structure: sigmoid scores with a correction bias, group-limited
    top-k, scaled; `first_k_dense_replace` dense layers; `n_shared_experts` ungated shared experts."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"routing scoring_func={hf.get('scoring_func')!r} topk_method={hf.get('topk_method')!r} is "
                         f"not supported (sigmoid with noaux_tc)")
    moe_every = hf.get("moe_layer_freq", 1)
    if moe_every != 1:
        raise ValueError(f"moe_layer_freq={moe_every} (MoE every few layers) is not supported (only 1)")
    return dict(num_experts=_num_experts(hf), moe_intermediate_size=hf["moe_intermediate_size"], router="sigmoid",
                n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                shared_expert_intermediate_size=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
                first_dense_layers=min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"]),
                dense_intermediate_size=hf["intermediate_size"])


def _mla(hf) -> dict[str, Any]:
    """DeepSeek's multi-head latent attention (V2 and V3 alike)."""
    return dict(attention="mla", head_dim=hf["qk_nope_head_dim"], num_kv_heads=hf["num_attention_heads"],
                kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank") or 0,
                qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                partial_rotary_factor=1.0)


def _deepseek_v3(hf):
    return dict(family="deepseek_v3", rope_interleave=bool(hf.get("rope_interleave", True)), **_mla(hf),
                **_grouped_routing(hf))


def _deepseek_v2(hf):
    """DeepSeek-V2 (and V2-Lite): MLA, softmax scores, top-k over all experts ("greedy") or within the topk_group
    groups of highest maximum ("group_limited_greedy"), weights not renormalised, times routed_scaling_factor.
    Its complex-number RoPE rotates adjacent pairs: the interleaved layout (outputs laid out differently from
    Hugging Face's, identically for q and k, so every q.k is the same)."""
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {method!r} is not supported for deepseek_v2 (greedy, group_limited_greedy)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True (biases on the dense and shared FFNs) is not supported")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq={hf['moe_layer_freq']} (MoE every few layers) is not supported (only 1)")
    grouped = method == "group_limited_greedy"
    return dict(family="deepseek_v2", rope_interleave=True, **_mla(hf), num_experts=_num_experts(hf),
                moe_intermediate_size=hf["moe_intermediate_size"], router="softmax", norm_topk_prob=False,
                n_group=(hf.get("n_group") or 1) if grouped else 1, topk_group=(hf.get("topk_group") or 1) if grouped
                else 1, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                shared_expert_intermediate_size=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
                first_dense_layers=min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"]),
                dense_intermediate_size=hf["intermediate_size"])


def _glm4_moe(hf):
    return dict(family="glm4_moe", qkv_bias=bool(hf.get("attention_bias")), qk_norm=bool(hf.get("use_qk_norm")),
                **_grouped_routing(hf))


def _olmoe(hf):
    return dict(family="olmoe", moe_intermediate_size=hf["intermediate_size"], num_experts=_num_experts(hf),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm=True, qk_norm_scope="all",
                qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                clip_qkv=float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None)


def _gpt_oss(hf):
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for gpt_oss (its clamped SwiGLU uses silu)")
    return dict(family="gpt_oss", moe_intermediate_size=hf["intermediate_size"], num_experts=_num_experts(hf),
                router="topk_softmax", router_bias=True, expert_activation="swiglu_clamped",
                swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                expert_bias=True, attention_sinks=True, qkv_bias=bool(hf.get("attention_bias", True)),
                o_bias=bool(hf.get("attention_bias", True)), **_sliding(hf, True))


_HF_FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "deepseek_v3": _deepseek_v3,
                "kimi_k2": _deepseek_v3,  # Kimi K2 publishes DeepSeek-V3's architecture under its own model_type
                "deepseek_v2": _deepseek_v2, "glm4_moe": _glm4_moe, "olmoe": _olmoe, "gpt_oss": _gpt_oss}
# MoE model types transformers ships that the runtime does not run, with what each lacks.
_UNSUPPORTED_TYPES = {
    "qwen3_next": "linear attention layers (gated DeltaNet, with a recurrent state cache) are not supported",
    "qwen3_5_moe": "linear attention layers (gated DeltaNet, with a recurrent state cache) are not supported",
    "llama4_text": "NoPE layers, chunked attention and top-1 sigmoid routing that scales the input are not supported",
    "llama4": "a vision-language model (and Llama 4's NoPE / chunked attention layers) is not supported",
    "minimax_m2": "its routing and attention variants are not implemented",
    "longcat_flash": "zero-compute experts are not supported",
    "jamba": "Mamba (state-space) layers are not supported",
    "granitemoehybrid": "Mamba (state-space) layers are not supported",
    "dbrx": "its fused Wqkv / expert layout and clip_qkv attention are not implemented",
    "jetmoe": "mixture-of-attention-heads layers are not supported",
    "phimoe": "its sparsemixer routing and LayerNorm are not implemented",
    "switch_transformers": "encoder-decoder models are not supported",
    "nllb_moe": "encoder-decoder models are not supported",
}


def load_model_config(source: str | Path | dict) -> ModelConfig:
    """Load a ModelConfig from a dict, a YAML file, a config.json file or a Hugging Face checkpoint directory.

    A bare name (no path separator, no suffix) is looked up in the built-in `configs/models/` (`configs_dir`).
    """
    if isinstance(source, dict):
        return ModelConfig.from_hf(source) if "model_type" in source else ModelConfig.from_dict(source)
    path = Path(source)
    if not path.exists() and path.suffix not in (".yaml", ".yml", ".json") and "/" not in str(source):
        candidate = configs_dir() / "models" / f"{source}.yaml"
        if not candidate.exists():
            known = sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))
            raise FileNotFoundError(f"no model config {source!r}; built-in configs: {known}")
        path = candidate
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"model config not found: {path}")
    if path.suffix == ".json":
        return ModelConfig.from_hf(json.loads(path.read_text()), name=path.parent.name)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of ModelConfig fields, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data)


def resolve_dtype(dtype: str, cfg: ModelConfig) -> str:
    """The concrete serving dtype for `dtype`: "auto" -> the model's own (`ModelConfig.serving_dtype`), else
    `dtype` itself, one of `SERVING_DTYPES` (ValueError otherwise). Resolved once, on the host."""
    if dtype == "auto":
        return cfg.serving_dtype
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype must be 'auto' (the checkpoint's own) or one of {', '.join(SERVING_DTYPES)}, got "
                         f"{dtype!r}")
    return dtype


def configs_dir() -> Path:
    """The built-in configs (data only): inside the package, so a wheel install ships them (the repository's
    top-level `configs/` is a link to this folder)."""
    return Path(__file__).resolve().parent / "configs"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b

