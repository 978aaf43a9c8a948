"""Memory formulas against hand-computed cases."""

import jax.numpy as jnp
import pytest
from flax import nnx

from moejax.config import ModelConfig, load_model_config
from moejax.fit import sharded_bytes
from moejax.mesh import Layout, make_mesh
from moejax.model.transformer import Geometry
from moejax.planner.hardware import load_hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import (
    GIB,
    kv_bytes_per_token_layer,
    memory_fit,
    param_counts,
    stage_weight_bytes,
    stages,
    stored_config,
    weights_per_device,
)
from moejax.planner.workload import Options, Workload
from moejax.sharding import Parallelism
from moejax.weights import abstract_model

# Sizes no TP > 1 divides: vocabulary 131, expert width 30, shared-expert width 36; 2 KV heads (replicated at TP4+).
ODD = ModelConfig(family="mixtral", vocab_size=131, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=2,
                  head_dim=8, moe_intermediate_size=30, num_experts=8, num_experts_per_tok=2,
                  shared_expert_intermediate_size=36, name="odd")


def test_mixtral_8x7b_params_by_hand():
    counts = param_counts(load_model_config("mixtral-8x7b"))
    attention = 2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128  # q, o + k, v
    expert = 3 * 4096 * 14336
    assert counts.attention == attention == 41_943_040
    assert counts.expert == expert == 176_160_768
    assert counts.total == 32 * (attention + 8 * expert + 4096 * 8) + 2 * 32000 * 4096 == 46_702_526_464
    assert counts.active == 32 * (attention + 2 * expert + 4096 * 8) + 2 * 32000 * 4096


def test_deepseek_v3_mla_params_by_hand():
    counts = param_counts(load_model_config("deepseek-v3"))
    q = 7168 * 1536 + 1536 * 128 * (128 + 64)
    kv = 7168 * (512 + 64) + 512 * 128 * (128 + 128)
    o = 128 * 128 * 7168
    assert counts.attention == q + kv + o == 187_105_280
    assert counts.shared == 3 * 7168 * 2048
    assert (counts.num_dense_layers, counts.num_moe_layers) == (3, 58)


def test_weights_per_device_gpt_tp8ep8_fp8_by_hand():
    cfg = load_model_config("gpt-moe-1800b")
    counts = param_counts(cfg)
    fp8 = 1 + 4 / 16384
    linear = 120 * (counts.attention + 16 // 8 * counts.expert) / 8 * fp8
    bf16 = 120 * 12288 * 16 * 2 + 2 * (100352 * 12288 / 8 * 2)  # router + embedding + LM head
    expected = linear + bf16
    # the runtime's fp8 (per output channel, bf16 scales: `QUANTIZED`) is within 2e-4 of the 128x128-block figure
    assert weights_per_device(cfg, Layout.parse("TP8EP8"), Workload(precision="fp8")) == pytest.approx(expected,
                                                                                                      rel=2e-4)
    assert expected / GIB == pytest.approx(30.5, abs=0.05)  # 2.139G params per layer x 120 / 8 in fp8, + 0.62 GB bf16


def test_fp4_block_scales_and_pipeline_split():
    cfg = load_model_config("gpt-moe-1800b")
    fp4 = weights_per_device(cfg, Layout.parse("TP8EP8"), Workload(precision="fp4"))
    bf16 = weights_per_device(cfg, Layout.parse("TP8EP8"), Workload(precision="bf16"))
    counts = param_counts(cfg)
    linear = 120 * (counts.attention + 2 * counts.expert) / 8
    assert bf16 - fp4 == pytest.approx(linear * (2 - 0.5625))  # NVFP4: 4 bits + one e4m3 scale per 16
    pp4 = weights_per_device(cfg, Layout.parse("TP8EP2PP4"), Workload(precision="fp4"))
    # embedding and LM head on every stage, split over tensor (the runtime keeps both on each stage)
    assert pp4 == pytest.approx((120 / 4 * (counts.attention + 8 * counts.expert) / 8) * 0.5625
                                + 30 * counts.router * 2 + 2 * 100352 * 12288 / 8 * 2)


def test_stages_put_dense_layers_first():
    cfg = load_model_config("deepseek-v3")
    shapes = stages(cfg, Layout(stage=4))
    assert [s.layers for s in shapes] == [16, 15, 15, 15]
    assert [s.dense_layers for s in shapes] == [3, 0, 0, 0]
    assert shapes[0].first and shapes[-1].last


def test_kv_bytes_per_token_gqa_replication_and_mla():
    mixtral, ds = load_model_config("mixtral-8x7b"), load_model_config("deepseek-v3")
    w = Workload(kv_precision="bf16")
    assert kv_bytes_per_token_layer(mixtral, Layout(), w) == 2 * 8 * 128 * 2
    assert kv_bytes_per_token_layer(mixtral, Layout(tensor=8), w) == 2 * 1 * 128 * 2
    # 16-way TP over 8 KV heads: each device still holds one (replicated) head
    assert kv_bytes_per_token_layer(mixtral, Layout(tensor=16), w) == 2 * 1 * 128 * 2
    # MLA latent cache: kv_lora_rank + rope dims, not split by TP
    mla = (512 + 64) * 2
    assert kv_bytes_per_token_layer(ds, Layout(tensor=8), w) == mla == kv_bytes_per_token_layer(ds, Layout(), w)


def test_kv_cache_split_over_attention_groups():
    cfg, hw = load_model_config("mixtral-8x7b"), load_hardware("h100-sxm")
    w = Workload(isl=1024, osl=1024)
    layout = Layout(tensor=2, expert=4)
    data = memory_fit(cfg, layout, hw, w, Options(expert_mode="dp_attention"), batch=64, chunk=512)
    rep = memory_fit(cfg, layout, hw, w, Options(expert_mode="replicated_attention"), batch=64, chunk=512)
    per_request = 2048 * 32 * (2 * 4 * 128 * 2)  # positions x layers x bytes per token-layer (4 kv heads / device)
    assert rep.kv_cache == 64 * per_request
    assert data.kv_cache == 16 * per_request


def test_infeasible_config_names_the_reason():
    cfg, hw = load_model_config("gpt-moe-1800b"), load_hardware("h100-sxm")
    fit = memory_fit(cfg, Layout(tensor=8), hw, Workload(precision="bf16"), Options(), batch=1, chunk=512)
    assert not fit.fits
    assert "needs" in fit.reason and "GiB per device" in fit.reason and "weights" in fit.reason
    assert fit.weights > 400 * GIB  # 1.78T bf16 over 8 devices


# Split layouts (the MoE's tensor factor apart from attention's), with their mesh axes (tensor, tensor_expert,
# data_tensor, expert) in the comments: every one of the four split axes, pipeline stages and data parallelism.
SPLIT = ["TP4MTP1EP4",  # 1, 4, 1, 1
         "TP4MTP1EP8",  # 1, 4, 1, 2
         "TP2MTP4EP2",  # 2, 1, 2, 2
         "TP4MTP2EP2",  # 2, 2, 1, 1
         "TP1MTP2EP4",  # 1, 1, 2, 4
         "TP2MTP4EP1",  # 2, 1, 2, 1
         "DP2TP2MTP1EP2",  # 1, 2, 1, 1
         "TP2MTP1EP2PP2"]  # 1, 2, 1, 1


@pytest.mark.parametrize("layout", ["DP1", "TP2", "TP4", "TP8", "TP2EP4", "TP4EP2", "EP8", "TP2EP2PP2", "PP2",
                                    *SPLIT])
def test_stored_sizes_are_the_runtime_geometry(layout):
    lay = Layout.parse(layout)
    geo, sized = Geometry.of(ODD, lay), stored_config(ODD, lay)
    assert stored_config(ODD, PlanLayout.of(layout)) == sized  # the planner's reading of the string: the same
    assert (sized.vocab_size, sized.moe_intermediate_size, sized.shared_expert_intermediate_size,
            sized.num_kv_heads) == (geo.vocab, geo.ffn, geo.shared_ffn, geo.num_kv_heads)
    t, e = lay.tensor, lay.expert
    assert sized.vocab_size % t == 0 and sized.moe_intermediate_size % lay.moe_tp == 0
    assert sized.shared_expert_intermediate_size % (t * e) == 0 and sized.vocab_size - ODD.vocab_size < t


# DeepSeek-shaped: MLA (replicated down-projections), 2 dense leading layers of an odd width, a shared expert,
# grouped sigmoid routing; 5 layers, so that pipeline stages store padding slots.
ODD_MLA = ModelConfig(family="deepseek_v3", vocab_size=131, hidden_size=32, num_layers=5, num_heads=8,
                      num_kv_heads=8, head_dim=8, moe_intermediate_size=30, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=36, first_dense_layers=2, dense_intermediate_size=50,
                      attention="mla", kv_lora_rank=12, q_lora_rank=20, qk_rope_head_dim=4, v_head_dim=6,
                      router="sigmoid", n_group=4, topk_group=2, name="odd-mla")


# gpt-oss-shaped (router and expert biases, sinks, q/k/v/o biases, windows on some layers) and GLM-shaped (a dense
# leading layer, partial rotary, q/k/v biases, ungrouped sigmoid routing) variants of ODD.
ODD_GPT_OSS = ODD.replace(family="gpt_oss", router="topk_softmax", router_bias=True, expert_activation="swiglu_clamped",
                          expert_bias=True, attention_sinks=True, qkv_bias=True, o_bias=True, sliding_window=4,
                          sliding_layers=(0, 2), shared_expert_intermediate_size=0, name="odd-gpt-oss")
ODD_GLM = ODD.replace(family="glm4_moe", num_layers=4, first_dense_layers=1, dense_intermediate_size=50,
                      partial_rotary_factor=0.5, qkv_bias=True, router="sigmoid", name="odd-glm")


def _runtime_linear_bytes(cfg, lay, expert_mode: str = "dp_attention") -> int:
    """Bytes per device of the runtime's linear weights (names w*, shared_w*, router, embed, unembed) in their
    shardings: what the planner counts (norms, biases, sinks and the routing bias left out)."""
    model = abstract_model(cfg, Parallelism(lay, expert_mode), jnp.bfloat16)
    linear = [(path, var) for path, var in nnx.to_flat_state(nnx.state(model))
              if str(path[-1]).startswith(("w", "shared_w")) or path[-1] in ("router", "embed", "unembed")]
    mesh = make_mesh(lay)
    return sum(sharded_bytes(var.get_value().shape, var.get_value().dtype,
                             model.par.named(mesh, var.get_metadata()["out_sharding"])) for _, var in linear)


@pytest.mark.parametrize("layout", ["DP1", "TP2", "TP4", "TP8", "TP2PP2", "TP4EP2", "EP8", "TP2EP2PP2", "PP3"])
@pytest.mark.parametrize("cfg", [ODD, ODD_MLA, ODD_GPT_OSS, ODD_GLM], ids=["gqa", "mla-dense", "gpt-oss", "glm"])
def test_weights_per_device_are_the_runtime_s_padded_bytes(cfg, layout):
    """The planner's weight bytes per device == the runtime's abstract model's linear weights in their shardings
    (bf16), padding and padding slots included. With EP > 1 the shared expert's and dense FFNs' split depends on
    the expert mode (the next test), so there the model has neither."""
    lay = Layout.parse(layout)
    if lay.expert > 1:
        cfg = cfg.replace(shared_expert_intermediate_size=0, first_dense_layers=0)
    assert weights_per_device(cfg, lay, Workload(precision="bf16")) == _runtime_linear_bytes(cfg, lay)


@pytest.mark.parametrize("layout", SPLIT)
@pytest.mark.parametrize("cfg", [ODD, ODD_MLA, ODD_GPT_OSS, ODD_GLM], ids=["gqa", "mla-dense", "gpt-oss", "glm"])
def test_split_layout_weights_per_device_are_the_runtime_s(cfg, layout):
    """Split layouts (attention TP t x DP, the MoE TP m x EP e over the same devices): the planner's weight bytes
    per device == the runtime's linear weights in their shardings, shared experts and dense FFNs included (over
    attention's tensor split: a split layout runs in the 'dp_attention' mode only)."""
    lay = Layout.parse(layout)
    assert weights_per_device(cfg, lay, Workload(precision="bf16")) == _runtime_linear_bytes(cfg, lay)


@pytest.mark.parametrize("layout", ["EP8", "TP2EP2", "TP2EP2PP2", "EP4PP2"])
@pytest.mark.parametrize("mode", ["dp_attention", "replicated_attention"])
def test_shared_expert_and_dense_ffn_bytes_follow_the_expert_mode(layout, mode):
    """Dense FFN layers and the shared expert split over tensor ('dp_attention') or tensor x expert
    ('replicated_attention'), padded to TP x EP either way: the planner's bytes == the runtime's."""
    lay = Layout.parse(layout)
    planner = weights_per_device(ODD_MLA, PlanLayout.of(lay, mode), Workload(precision="bf16"))
    assert planner == _runtime_linear_bytes(ODD_MLA, lay, mode)


def test_padding_is_counted_by_hand():
    cfg = load_model_config("mixtral-8x7b").replace(vocab_size=32001, moe_intermediate_size=14337)
    w, lay = Workload(precision="bf16"), Layout(tensor=8)
    pc = param_counts(cfg)
    attention = 2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128
    padded = 32 * (attention / 8 + 8 * 3 * 4096 * 14344 / 8 + 4096 * 8) * 2 + 2 * 32008 * 4096 / 8 * 2
    assert weights_per_device(cfg, lay, w) == pytest.approx(padded)
    assert pc.embed == 32001 * 4096 and pc.expert == 3 * 4096 * 14337  # the model's own counts stay unpadded


def test_shared_expert_split_over_tensor_and_expert_where_attention_is_replicated():
    w, stage = Workload(precision="bf16"), stages(ODD, Layout())[0]
    data = stage_weight_bytes(ODD, PlanLayout.of("TP2EP2", "dp_attention"), w, stage)
    rep = stage_weight_bytes(ODD, PlanLayout.of("TP2EP2", "replicated_attention"), w, stage)
    shared = 3 * 32 * 36 * 2 * 3  # 3 matrices of D x 36 (36 = a multiple of TP x EP), bf16, 3 layers
    assert data - rep == pytest.approx(shared / 2 - shared / 4)
    ep8 = [stage_weight_bytes(ODD, PlanLayout.of("EP8", mode), w, stage)
           for mode in ("dp_attention", "replicated_attention")]
    assert ep8[0] - ep8[1] == pytest.approx(3 * 32 * 40 * 2 * 3 * (1 - 1 / 8))  # 36 padded to 40 = 5 x 8
