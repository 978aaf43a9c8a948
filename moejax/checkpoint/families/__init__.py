"""Checkpoint name tables, one module per model family: canonical tensor -> where a Hugging Face checkpoint keeps
it (`forms.Stored`: a name template and a stored form).

Canonical names and shapes come from the model's declarations (`moejax.weights.canonical_shapes`); a family's
table says only where each one is stored and how, so adding a weight is its declaration plus one table line.
A table may list tensors a given config does not declare (biases, norms, query compression): only the
declared ones are looked up. `moejax.checkpoint.hf` reads through these tables, and the demo checkpoint
writer (`moejax.demo`) inverts them.
"""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType
from typing import Any

from moejax.checkpoint.families import deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen_moe
from moejax.checkpoint.families.forms import Stored
from moejax.config import ModelConfig

__all__ = ["FAMILIES", "mtp_layers", "names_for"]

FAMILIES: dict[str, ModuleType] = {"mixtral": mixtral, "qwen2_moe": qwen_moe, "qwen3_moe": qwen_moe,
                                   "deepseek_v3": deepseek_v3, "deepseek_v2": deepseek_v3, "glm4_moe": glm4_moe,
                                   "olmoe": olmoe,
                                   "gpt_oss": gpt_oss}


def names_for(cfg: ModelConfig, found: Collection[str] = ()) -> dict[str, Stored]:
    """Canonical tensor name -> `Stored` (name template, form) for `cfg`'s family.

    `found`: the checkpoint's tensor names, which pick among the exports of one family (fused or per-expert
    experts; Mixtral's `block_sparse_moe` or `mlp`); empty: the family's default export (per-expert experts).
    """
    if cfg.family not in FAMILIES:
        raise ValueError(f"family {cfg.family!r} has no Hugging Face checkpoint table; families with one: "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[cfg.family].names(found)


def mtp_layers(cfg: ModelConfig, hf: dict[str, Any]) -> int:
    """How many multi-token-prediction layers a checkpoint of config.json `hf` may store after the last layer
    (`model.layers.{num_hidden_layers + i}`): 0 for families without them."""
    module = FAMILIES.get(cfg.family)
    return module.mtp_layers(hf) if module is not None and hasattr(module, "mtp_layers") else 0
