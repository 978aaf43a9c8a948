"""DeepSeek-V3 (and R1, V3.1, Kimi K2): multi-head latent attention, dense first layers, sigmoid router with a
score-correction bias, routed experts and ungated shared experts (`mlp.shared_experts`). DeepSeek-V2 stores the
same names (its softmax router has no correction bias, which its config does not declare).

MLA: the query is `q_proj` [N*(nope+rope), D], or with query compression `q_a_proj` [Rq, D] ->
`q_a_layernorm` -> `q_b_proj` [N*(nope+rope), Rq]; keys and values come from `kv_a_proj_with_mqa`
[R+rope, D] (the latent and the shared rope key), `kv_a_layernorm` [R] and `kv_b_proj` [N*(nope+v), R]
(heads on the output rows, each head's nope key then value); `o_proj` [D, N*v]. Published checkpoints carry
the multi-token-prediction layers as `model.layers.{num_hidden_layers + i}` (`mtp_layers`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import HEADS_IN, HEADS_OUT, SAME, Stored, T

_ATTN = _common.LAYER + "self_attn."
MLA = {
    "attn.wq": Stored(_ATTN + "q_proj.weight", HEADS_IN),
    "attn.wq_a": Stored(_ATTN + "q_a_proj.weight", T),
    "attn.bq_a": Stored(_ATTN + "q_a_proj.bias", SAME),
    "attn.q_a_norm": Stored(_ATTN + "q_a_layernorm.weight", SAME),
    "attn.wq_b": Stored(_ATTN + "q_b_proj.weight", HEADS_IN),
    "attn.wkv_a": Stored(_ATTN + "kv_a_proj_with_mqa.weight", T),
    "attn.bkv_a": Stored(_ATTN + "kv_a_proj_with_mqa.bias", SAME),
    "attn.kv_a_norm": Stored(_ATTN + "kv_a_layernorm.weight", SAME),
    "attn.wkv_b": Stored(_ATTN + "kv_b_proj.weight", HEADS_IN),
    "attn.wo": Stored(_ATTN + "o_proj.weight", HEADS_OUT),
    "attn.bo": Stored(_ATTN + "o_proj.bias", SAME),
}
# The sigmoid router and its correction bias (DeepSeek-V3 and GLM-4.5 alike).
GROUPED_ROUTER = {
    "moe.router": Stored(_common.LAYER + "mlp.gate.weight", T),
    "moe.score_bias": Stored(_common.LAYER + "mlp.gate.e_score_correction_bias", SAME),
}


def names(found: Collection[str]) -> dict[str, Stored]:
    return {**_common.GLOBAL, **_common.NORMS, **MLA, **_common.DENSE_FFN, **GROUPED_ROUTER,
            **_common.routed_experts("mlp", found), **_common.shared_expert("mlp.shared_experts")}


def mtp_layers(hf: dict[str, Any]) -> int:
    """Multi-token-prediction layers stored after the last layer (the hub's name, or transformers' own)."""
    return int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
