"""GLM-4.5 / 4.6: GQA attention (q/k/v biases, optional per-head q/k norms, no output bias), DeepSeek-style
dense first layers, sigmoid router with a correction bias, routed and shared experts; published checkpoints
carry multi-token-prediction layers after the last layer."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.deepseek_v3 import GROUPED_ROUTER, mtp_layers
from moejax.checkpoint.families.forms import Stored

__all__ = ["mtp_layers", "names"]


def names(found: Collection[str]) -> dict[str, Stored]:
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA, **_common.DENSE_FFN, **GROUPED_ROUTER,
            **_common.routed_experts("mlp", found), **_common.shared_expert("mlp.shared_experts")}
