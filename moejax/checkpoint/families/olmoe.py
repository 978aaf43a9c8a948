"""OLMoE: GQA attention whose q/k RMSNorms span the whole projection (`q_norm.weight` [N*H], `k_norm.weight`
[K*H], canonical [N, H] / [K, H]), softmax top-k router, routed experts."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import FLAT, Stored, T


def names(found: Collection[str]) -> dict[str, Stored]:
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA,
            "attn.q_norm": Stored(_common.LAYER + "self_attn.q_norm.weight", FLAT),
            "attn.k_norm": Stored(_common.LAYER + "self_attn.k_norm.weight", FLAT),
            "moe.router": Stored(_common.LAYER + "mlp.gate.weight", T),
            **_common.routed_experts("mlp", found)}
