"""gpt-oss: GQA attention with q/k/v/o biases and a learned sink logit per head (`self_attn.sinks` [N]), a
biased router (`mlp.router`), experts with biases stored fused and not transposed:
`mlp.experts.gate_up_proj` [E, D, 2F] with gate and up columns interleaved (gate even, up odd),
`gate_up_proj_bias` [E, 2F] likewise, `down_proj` [E, F, D], `down_proj_bias` [E, D]. The published
checkpoints store the experts in MXFP4 (`moejax.checkpoint.quantized`), as torch's [out, in]:
`gate_up_proj_blocks` [E, 2F, D / 32, 16] (gate and up rows interleaved) and `down_proj_blocks` [E, D, F / 32, 16],
with their `_scales`."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families import _common
from moejax.checkpoint.families.forms import EVEN, EVEN_ROWS, ODD, ODD_ROWS, SAME, Experts, Stored, T

_EXPERTS = _common.LAYER + "mlp.experts."


def names(found: Collection[str]) -> dict[str, Stored]:
    experts = {"moe.wg": Stored(_EXPERTS + "gate_up_proj", Experts(EVEN)),  # per expert [D, 2F] -> [D, F]
               "moe.wu": Stored(_EXPERTS + "gate_up_proj", Experts(ODD)),
               "moe.wd": Stored(_EXPERTS + "down_proj", Experts(SAME))}  # [E, F, D] as it is
    if any(n.endswith("mlp.experts.gate_up_proj_blocks") for n in found):  # MXFP4: [out, in] per expert
        experts = {"moe.wg": Stored(_EXPERTS + "gate_up_proj_blocks", Experts(EVEN_ROWS)),
                   "moe.wu": Stored(_EXPERTS + "gate_up_proj_blocks", Experts(ODD_ROWS)),
                   "moe.wd": Stored(_EXPERTS + "down_proj_blocks", Experts(T))}
    return {**_common.GLOBAL, **_common.NORMS, **_common.GQA,
            "attn.sinks": Stored(_common.LAYER + "self_attn.sinks", SAME),
            "moe.router": Stored(_common.LAYER + "mlp.router.weight", T),
            "moe.router_bias": Stored(_common.LAYER + "mlp.router.bias", SAME),
            **experts,
            "moe.bg": Stored(_EXPERTS + "gate_up_proj_bias", EVEN),  # [E, 2F] -> [E, F]
            "moe.bu": Stored(_EXPERTS + "gate_up_proj_bias", ODD),
            "moe.bd": Stored(_EXPERTS + "down_proj_bias", SAME)}
