"""Mixtral: GQA attention, softmax top-k router, experts `w1` (gate), `w3` (up), `w2` (down).

Hub checkpoints (and transformers' save_pretrained) name the MoE block `block_sparse_moe`, the default export;
transformers' in-memory names are `mlp` with `gate_proj` / `up_proj` / `down_proj` experts or fused ones: both
are read."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import Stored, T


def names(found: Collection[str]) -> dict[str, Stored]:
    block = "mlp" if any(n.endswith(".mlp.gate.weight") for n in found) else "block_sparse_moe"
    experts = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA,
            "moe.router": Stored(f"{_common.LAYER}{block}.gate.weight", T),
            **_common.routed_experts(block, found, experts)}
