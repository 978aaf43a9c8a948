"""gpt-oss: GQA attention with q/k/v/o biases and a learned sink logit per head (`self_attn.sinks` [N]), a
biased router (`mlp.router`), experts with biases stored fused and not transposed:
`mlp.experts.gate_up_proj` [E, D, 2F] with gate and up columns interleaved (gate even, up odd),
`gate_up_proj_bias` [E, 2F] likewise, `down_proj` [E, F, D], `down_proj_bias` [E, D]. (The published
checkpoints store the experts in MXFP4 and declare a quantization_config: refused.)"""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import EVEN, ODD, SAME, Experts, Stored, T

_EXPERTS = _common.LAYER + "mlp.experts."


def names(found: Collection[str]) -> dict[str, Stored]:
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA,
            "attn.sinks": Stored(_common.LAYER + "self_attn.sinks", SAME),
            "moe.router": Stored(_common.LAYER + "mlp.router.weight", T),
            "moe.router_bias": Stored(_common.LAYER + "mlp.router.bias", SAME),
            "moe.wg": Stored(_EXPERTS + "gate_up_proj", Experts(EVEN)),  # per expert [D, 2F] -> [D, F]
            "moe.wu": Stored(_EXPERTS + "gate_up_proj", Experts(ODD)),
            "moe.wd": Stored(_EXPERTS + "down_proj", Experts(SAME)),  # [E, F, D] as it is
            "moe.bg": Stored(_EXPERTS + "gate_up_proj_bias", EVEN),  # [E, 2F] -> [E, F]
            "moe.bu": Stored(_EXPERTS + "gate_up_proj_bias", ODD),
            "moe.bd": Stored(_EXPERTS + "down_proj_bias", SAME)}
