"""Qwen2-MoE and Qwen3-MoE: GQA attention (Qwen2: q/k/v biases; Qwen3: per-head q/k norms), softmax top-k
router; Qwen2-MoE adds a shared expert scaled by sigmoid(x . shared_expert_gate)."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import ROW, Stored, T


def names(found: Collection[str]) -> dict[str, Stored]:
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA,
            "moe.router": Stored(_common.LAYER + "mlp.gate.weight", T),
            **_common.routed_experts("mlp", found),
            **_common.shared_expert("mlp.shared_expert"),
            "moe.shared_gate": Stored(_common.LAYER + "mlp.shared_expert_gate.weight", ROW)}
