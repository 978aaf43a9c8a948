"""Name tables most families share: Llama-style globals, norms, GQA attention, dense FFN, routed experts."""

from __future__ import annotations

from collections.abc import Collection

from moejax.checkpoint.families.forms import FLAT, HEADS_IN, HEADS_OUT, SAME, Experts, Stored, T

LAYER = "model.layers.{layer}."

GLOBAL = {
    "embed": Stored("model.embed_tokens.weight", SAME),
    "unembed": Stored("lm_head.weight", T),
    "final_norm": Stored("model.norm.weight", SAME),
}
NORMS = {
    "attn_norm": Stored(LAYER + "input_layernorm.weight", SAME),
    "mlp_norm": Stored(LAYER + "post_attention_layernorm.weight", SAME),
}
GQA = {
    "attn.wq": Stored(LAYER + "self_attn.q_proj.weight", HEADS_IN),
    "attn.wk": Stored(LAYER + "self_attn.k_proj.weight", HEADS_IN),
    "attn.wv": Stored(LAYER + "self_attn.v_proj.weight", HEADS_IN),
    "attn.wo": Stored(LAYER + "self_attn.o_proj.weight", HEADS_OUT),
    "attn.bq": Stored(LAYER + "self_attn.q_proj.bias", FLAT),
    "attn.bk": Stored(LAYER + "self_attn.k_proj.bias", FLAT),
    "attn.bv": Stored(LAYER + "self_attn.v_proj.bias", FLAT),
    "attn.bo": Stored(LAYER + "self_attn.o_proj.bias", SAME),
    "attn.q_norm": Stored(LAYER + "self_attn.q_norm.weight", SAME),  # per head [H]
    "attn.k_norm": Stored(LAYER + "self_attn.k_norm.weight", SAME),
}
DENSE_FFN = {  # the dense layers before the MoE layers (DeepSeek-V3, GLM-4.5)
    "mlp.wg": Stored(LAYER + "mlp.gate_proj.weight", T),
    "mlp.wu": Stored(LAYER + "mlp.up_proj.weight", T),
    "mlp.wd": Stored(LAYER + "mlp.down_proj.weight", T),
}


def shared_expert(prefix: str) -> dict[str, Stored]:
    """An ungated SwiGLU shared expert under `prefix` ("mlp.shared_expert" or "mlp.shared_experts")."""
    return {f"moe.shared_w{k}": Stored(f"{LAYER}{prefix}.{proj}_proj.weight", T)
            for k, proj in (("g", "gate"), ("u", "up"), ("d", "down"))}


def routed_experts(block: str, found: Collection[str], names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                         "down_proj")) -> dict:
    """Routed experts under `block`, canonical [E, D, F] / [E, F, D]: fused when the checkpoint has a
    `{block}.experts.gate_up_proj` ([E, 2F, D] gate rows first, `down_proj` [E, D, F], transformers' in-memory
    layout), else one matrix per expert `{block}.experts.{e}.<name>.weight` ([F, D] / [D, F]); both transposed."""
    prefix = f"{LAYER}{block}.experts."
    if any(n.endswith(f".{block}.experts.gate_up_proj") for n in found):
        return {"moe.wg": Stored(prefix + "gate_up_proj", Experts(T, (0, 2))),
                "moe.wu": Stored(prefix + "gate_up_proj", Experts(T, (1, 2))),
                "moe.wd": Stored(prefix + "down_proj", Experts(T))}
    return {f"moe.w{k}": Stored(prefix + "{expert}." + name + ".weight", Experts(T))
            for k, name in zip("gud", names, strict=True)}
