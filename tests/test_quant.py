"""Post-training weight quantization at load (`moejax.quant`): int8 / fp8 per output channel, int4 in blocks.

The quantized model must equal the float model run on the dequantized weights (the quantization is the only
error), be the same on every layout (scales come from whole contracted dims, never from one shard), store its
values in the storage dtype, and refuse what it cannot run by name.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import moejax
from moejax import quant
from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.weights import RandomSource, abstract_model

BASE = dict(vocab_size=128, hidden_size=48, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
CONFIGS = {
    "mixtral": ModelConfig(family="mixtral", **BASE),
    "deepseek": ModelConfig(family="deepseek_v3", **{**BASE, "num_kv_heads": 8}, attention="mla", kv_lora_rank=16,
                            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, router="sigmoid", n_group=4,
                            topk_group=2, shared_expert_intermediate_size=32, first_dense_layers=1,
                            dense_intermediate_size=40),
}
IDS = np.random.default_rng(0).integers(0, 128, (2, 20))


def _contracted(cfg, quantization):
    """Canonical name -> contracted dims (without the layer axis) of each quantized weight."""
    model = abstract_model(cfg, Layout(), jnp.float32, quantization)
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, quant.Quantized):
            stacked = path[0] in ("layers", "dense_layers")
            name = ".".join(str(p) for p in (path[1:] if stacked else path))
            out[name] = tuple(d - stacked for d in node.contracted)
    return out


class DequantizedSource:
    """The float weights each quantized weight stands for: quantized per output channel and dequantized (qwix)."""

    def __init__(self, cfg, quantization, seed=1):
        self.inner, self.scheme = RandomSource(cfg, seed), quant.SCHEMES[quantization]
        self.contracted = _contracted(cfg, quantization)

    def read(self, name, layer, index):
        if name not in self.contracted:
            return self.inner.read(name, layer, index)
        whole = self.inner.read(name, layer, tuple(slice(None) for _ in self.inner.shapes[name][0]))
        dims = self.contracted[name]
        q = qwix.quantize(jnp.asarray(whole), self.scheme.qtype,
                          channelwise_axes=tuple(d for d in range(whole.ndim) if d not in dims))
        return np.asarray(qwix.dequantize(q))[index]


# The default suite keeps each format and each family once (int4 on MLA's blocks); the rest in CI's slow step.
DEQUANTIZED_DEFAULT = {("int8", "mixtral"), ("fp8", "deepseek"), ("int4", "deepseek")}


@pytest.mark.parametrize(("quantization", "family"), [
    pytest.param(q, f, marks=() if (q, f) in DEQUANTIZED_DEFAULT else pytest.mark.slow)
    for q in ("int8", "fp8", "int4") for f in CONFIGS])
def test_quantized_model_is_the_float_model_on_dequantized_weights(family, quantization):
    """Only the weights' rounding differs: the quantized model (dequantizing inside the step) equals a float
    model given the dequantized weights. The widths here (< 128) put int4 on one block per channel too."""
    cfg = CONFIGS[family]
    q = moejax.Model.random(cfg, seed=1, layout="DP1", quantization=quantization)
    ref = moejax.Model(cfg, DequantizedSource(cfg, quantization), layout="DP1")
    np.testing.assert_allclose(q.forward(IDS), ref.forward(IDS), atol=2e-5, rtol=0)
    float_logits = moejax.Model.random(cfg, seed=1, layout="DP1").forward(IDS)
    assert np.abs(q.forward(IDS) - float_logits).max() > 1e-3  # the weights really are quantized


@pytest.mark.parametrize("family,layout,mode", [  # the default suite keeps one (its run time: docs/benchmarks.md)
    pytest.param("mixtral", "TP2EP2PP2", "dp_attention", marks=pytest.mark.slow),
    pytest.param("deepseek", "DP2EP2", "replicated_attention", marks=pytest.mark.slow),
    ("deepseek", "TP4EP2", "dp_attention")])
def test_quantized_model_is_the_same_on_every_layout(family, layout, mode):
    cfg = CONFIGS[family]
    one = moejax.Model.random(cfg, seed=1, layout="DP1", quantization="int8")
    many = moejax.Model.random(cfg, seed=1, layout=layout, expert_mode=mode, quantization="int8")
    np.testing.assert_allclose(many.forward(IDS), one.forward(IDS), atol=1e-5, rtol=0)
    prompts = [IDS[0, :7].tolist(), IDS[1, :3].tolist()]
    assert many.generate(prompts, max_new_tokens=8) == one.generate(prompts, max_new_tokens=8)


def test_values_are_stored_in_their_dtype_and_scales_per_channel():
    cfg = CONFIGS["mixtral"]
    model = moejax.Model.random(cfg, layout="TP2EP2", quantization="fp8")
    wg = model.params["layers"]["moe"]["wg"]
    assert wg["values"].dtype == jnp.float8_e4m3fn and wg["values"].shape == (3, 8, 48, 32)
    assert wg["scale"].shape == (3, 8, 1, 32) and wg["scale"].dtype == jnp.float32
    assert model.params["layers"]["attn"]["wo"]["scale"].shape == (3, 1, 1, 48)
    assert model.params["embed"].dtype == jnp.float32  # the embedding (a gather) and the router stay float
    assert model.params["layers"]["moe"]["router"].dtype == jnp.float32
    q_bytes = quant.bytes_of(model.params["layers"]["moe"])
    f_bytes = quant.bytes_of(moejax.Model.random(cfg, layout="TP2EP2").params["layers"]["moe"])
    assert q_bytes < 0.3 * f_bytes


def test_int4_uses_blocks_of_128_along_the_contracted_dim():
    cfg = CONFIGS["mixtral"].replace(hidden_size=256, moe_intermediate_size=256, head_dim=32)
    model = moejax.Model.random(cfg, layout="TP2", quantization="int4")
    wg, wd = model.params["layers"]["moe"]["wg"], model.params["layers"]["moe"]["wd"]
    assert wg["values"].dtype == jnp.int4 and wg["scale"].shape == (3, 8, 2, 256)  # D = 256: 2 blocks
    assert wd["scale"].shape == (3, 8, 2, 256)  # F = 256 over TP2: one block on each shard, split with F
    assert wd["scale"].sharding.spec[2] == "tensor"
    tp4 = moejax.Model.random(cfg, layout="TP4", quantization="int4")
    assert tp4.params["layers"]["moe"]["wd"]["scale"].shape == (3, 8, 1, 256)  # 64 per shard: one block per channel
    logits = model.forward(IDS)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(moejax.Model.random(cfg, layout="DP1", quantization="int4").forward(IDS), logits,
                               atol=1e-5, rtol=0)  # the same blocks on one device


def test_unknown_quantization_and_float_only_kernels_are_refused_by_name():
    cfg = CONFIGS["mixtral"]
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose from"):
        moejax.Model.random(cfg, quantization="int3")
    model = moejax.Model.random(cfg, layout="DP1", quantization="int8", moe_strategy="blocks")
    with pytest.raises(ValueError, match="MoE dispatch 'blocks' runs float, bias-free SiLU experts only; this "
                                         "model's experts are quantized"):
        model.forward(IDS)


def test_the_planner_takes_the_runtime_s_names():
    from moejax.config import QUANTIZATIONS
    from moejax.planner.hardware import PRECISIONS, load_hardware
    from moejax.planner.workload import WEIGHT_BYTES

    assert set(QUANTIZATIONS) <= set(PRECISIONS) and set(QUANTIZATIONS) <= set(WEIGHT_BYTES)
    assert WEIGHT_BYTES["int4"] == 0.5 + 2 / quant.INT4_BLOCK  # bf16 scales per block of 128
    hw = load_hardware("h100-sxm")
    assert hw.compute_precision("int8") == hw.compute_precision("int4") == "bf16"  # weight-only: bf16 matmuls
