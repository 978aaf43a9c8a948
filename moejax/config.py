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

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_moe")
RUNTIME_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of an MoE transformer.

    Dimension letters (see `moejax.model`): V vocab, D width, L layers, N query heads, K kv heads,
    H head dim, F routed-expert FFN width, E experts, X experts per token.
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
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, per head
    qkv_bias: bool = False
    o_bias: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    # Structure read by the planner; the runtime rejects non-default values (check_runtime_support).
    first_dense_layers: int = 0  # DeepSeek-V3: leading layers with a dense FFN instead of MoE
    dense_intermediate_size: int = 0  # FFN width of those dense layers
    attention: str = "gqa"  # "gqa" | "mla"
    kv_lora_rank: int = 0  # MLA: compressed KV width cached per token per layer
    q_lora_rank: int = 0  # MLA: compressed query width (0: no query compression)
    qk_rope_head_dim: int = 0  # MLA: decoupled RoPE key width cached per token per layer
    v_head_dim: int = 0  # MLA: value head dim (0: head_dim)
    routed_scaling_factor: float = 1.0
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
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', got {self.attention!r}")
        rope_field = "qk_rope_head_dim" if self.attention == "mla" else "head_dim"
        if getattr(self, rope_field) % 2:  # RoPE rotates pairs of dimensions (the kernels take any even width)
            raise ValueError(f"ModelConfig.{rope_field} must be even (rotary embeddings rotate pairs of dimensions), "
                             f"got {getattr(self, rope_field)}")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers}) must lie in [0, {self.num_layers}]")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def check_runtime_support(self) -> None:
        """Raise ValueError naming every feature the runtime model does not implement."""
        problems = []
        if self.family not in RUNTIME_FAMILIES:
            problems.append(f"family {self.family!r} is planner-only (runtime families: {RUNTIME_FAMILIES})")
        if self.attention != "gqa":
            problems.append(f"attention {self.attention!r} (runtime supports 'gqa')")
        if self.first_dense_layers:
            problems.append(f"first_dense_layers={self.first_dense_layers} (runtime supports MoE in every layer)")
        if self.routed_scaling_factor != 1.0:
            problems.append(f"routed_scaling_factor={self.routed_scaling_factor} (runtime supports 1.0)")
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
        """Translate a Hugging Face config.json dict (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
        model_type = hf.get("model_type")
        if model_type not in RUNTIME_FAMILIES:
            raise ValueError(
                f"Hugging Face model_type {model_type!r} is not supported; supported: {RUNTIME_FAMILIES}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        for key in ("mlp_only_layers",):
            if hf.get(key):
                raise ValueError(f"{key}={hf[key]} (dense FFN layers in an MoE model) is not supported")
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported (only 1)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        sliding = hf.get("sliding_window")
        if model_type != "mixtral" and not hf.get("use_sliding_window", False):
            sliding = None
        num_experts = hf.get("num_local_experts") or hf.get("num_experts")
        common = dict(
            name=name or hf.get("_name_or_path", "") or model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            num_experts=num_experts,
            num_experts_per_tok=hf["num_experts_per_tok"],
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=sliding or None,
        )
        if model_type == "mixtral":
            return cls(family="mixtral", moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True, **common)
        shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        return cls(
            family=model_type,
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=shared,
            shared_expert_gate=bool(shared),
            qk_norm=model_type == "qwen3_moe",
            qkv_bias=bool(hf.get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(hf.get("attention_bias")),
            o_bias=model_type == "qwen3_moe" and bool(hf.get("attention_bias")),
            **common,
        )


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


def configs_dir() -> Path:
    """The built-in configs (data only): inside the package, so a wheel install ships them (the repository's
    top-level `configs/` is a link to this folder)."""
    return Path(__file__).resolve().parent / "configs"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b

