"""The dense FFN kind (DeepSeek-V3's and GLM-4.5's first layers) and the SwiGLU every expert shares.

A dense FFN layer is laid out like the MoE's shared expert (`moejax.model.moe`): its width is split over the
axes of the logical "shared_ffn" dim (tensor, and expert in the replicated_attention mode, where every device of
an expert group holds the same tokens) and one all-reduce over them completes it. The width is padded with zero
columns to a multiple of those axes (exact: silu(0) * 0 = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model import fp8_matmul
from moejax.model.fp8_matmul import dot
from moejax.model.layers import declare_weight
from moejax.quant import Scheme
from moejax.sharding import Parallelism

SILU = ("silu",)  # the expert activation of every family but gpt-oss (`activation_of`)


def activation_of(cfg: ModelConfig) -> tuple:
    """The routed experts' activation, static and hashable: ("silu",) or ("swiglu_clamped", alpha, limit)."""
    if cfg.expert_activation == "swiglu_clamped":
        return ("swiglu_clamped", cfg.swiglu_alpha, cfg.swiglu_limit)
    return SILU


def glu(gate, up, act: tuple = SILU):
    """The gated unit: silu(gate) * up; gpt-oss's clamped form: gate <= limit, |up| <= limit,
    gate * sigmoid(alpha gate) * (up + 1)."""
    if act[0] == "silu":
        return jax.nn.silu(gate) * up
    _, alpha, limit = act
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(gate * alpha) * (up + 1)


def swiglu(x_MD, wg_DF, wu_DF, wd_FD, biases=None, act: tuple = SILU):
    """One SwiGLU FFN (an expert, the shared expert or a dense layer); biases (bg [F], bu [F], bd [D]) or None.
    A weight may be a quantized slice (`qwix.QArray`): `fp8_matmul.dot` dequantizes it, or runs FP8 (W8A8)."""
    g_MF, u_MF = dot(x_MD, wg_DF), dot(x_MD, wu_DF)
    if biases is not None:
        g_MF, u_MF = g_MF + biases[0], u_MF + biases[1]
    y_MD = dot(glu(g_MF, u_MF, act), wd_FD)
    return y_MD if biases is None else y_MD + biases[2]


class DenseFFN(nnx.Module):
    """SwiGLU weights of a stack's dense layers, width split like the shared expert's."""

    def __init__(self, cfg: ModelConfig, par: Parallelism, num_layers: int, width: int, dtype,
                 quant: Scheme | None = None):
        L, D = num_layers, cfg.hidden_size
        self.par = par
        self.wg = declare_weight((L, D, width), ("layers", "embed", "shared_ffn"), dtype, (1,), quant)
        self.wu = declare_weight((L, D, width), ("layers", "embed", "shared_ffn"), dtype, (1,), quant)
        self.wd = declare_weight((L, width, D), ("layers", "shared_ffn", "embed"), dtype, (1,), quant,
                                 {1: par.size("shared_ffn")})

    def __call__(self, layer, x_BTD, valid_BT=None):
        del valid_BT
        with jax.named_scope("mlp"):
            y_BTD = swiglu(x_BTD, *(fp8_matmul.at_layer(w, layer) for w in (self.wg, self.wu, self.wd)))
            return self.par.psum(y_BTD, "shared_ffn")
