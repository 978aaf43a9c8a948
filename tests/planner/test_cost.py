"""Cost-model formulas against hand-computed cases and the worked decode example of "How to Scale Your Model"."""

import math

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.cost import (
    Load,
    allreduce_time,
    expert_fanout,
    layer_flops_per_token,
    stage_comm_time,
    stage_cost,
    stage_features,
)
from moejax.planner.hardware import FRACTIONS, Efficiency, Hardware, load_hardware
from moejax.planner.memory import param_counts, stages
from moejax.planner.workload import Options, Workload


def test_flops_per_token_by_hand():
    cfg = load_model_config("mixtral-8x7b")
    f = layer_flops_per_token(cfg, context=1000, phase="decode")
    assert f["attention"] == 2 * 41_943_040 + 2 * 32 * (128 + 128) * 1000  # projections + QK^T and AV
    assert f["experts"] == 2 * 2 * 3 * 4096 * 14336  # top-2 SwiGLU experts
    per_token = 32 * (f["attention"] + f["experts"] + f["router"]) + 2 * 32000 * 4096
    counts = param_counts(cfg)
    assert per_token - 32 * 2 * 32 * 256 * 1000 == pytest.approx(2 * (counts.active - counts.embed))  # 2 x active


def test_mla_attention_flops_absorbed_in_decode():
    cfg = load_model_config("deepseek-v3")
    dec = layer_flops_per_token(cfg, context=4096, phase="decode")["attention"]
    pre = layer_flops_per_token(cfg, context=4096, phase="prefill")["attention"]
    proj = 2 * param_counts(cfg).attention
    assert dec - proj == 2 * 128 * (576 + 512) * 4096  # scores over the 576-wide latent, values in the 512 latent
    assert pre - proj == 2 * 128 * (192 + 128) * 4096


def test_expert_fanout_by_hand():
    assert expert_fanout(16, 2, 8) == pytest.approx(8 * (1 - math.comb(14, 2) / math.comb(16, 2)))  # 1.933
    assert expert_fanout(16, 2, 1) == pytest.approx(1.0)
    assert expert_fanout(16, 2, 16) == pytest.approx(2.0)  # one expert per rank: k distinct ranks
    assert expert_fanout(256, 8, 64) == pytest.approx(64 * (1 - math.comb(252, 8) / math.comb(256, 8)))


# Ideal curves: every fraction 1, every half-saturation size, latency and skew 0 (the plain roofline).
IDEAL = Efficiency(**{k: 1.0 if k in FRACTIONS else 0.0 for k in Efficiency.__dataclass_fields__})


def _ideal(hw: Hardware) -> Hardware:
    return hw.with_efficiency(IDEAL)


def test_comm_volume_per_layout_by_hand():
    cfg, hw = load_model_config("gpt-moe-1800b"), _ideal(load_hardware("gb200-nvl72"))
    w, load = Workload(), Load(decode=64, group_decode=64 / 8)
    stage = stages(cfg, Layout())[0]
    token = 12288 * 2
    # TP8EP8, attention data-parallel over EP: 2 all-reduces per layer of the group's 8 tokens,
    # plus dispatch + combine to the remote share of the top-2 fan-out.
    volume, seconds = stage_comm_time(cfg, Layout(tensor=8, expert=8), hw, w, Options(), stage, load)
    tp = 2 * 120 * 2 * 7 / 8 * 8 * token
    a2a = 120 * 2 * 8 * token * expert_fanout(16, 2, 8) * 7 / 8
    assert volume == pytest.approx(tp + a2a)
    assert seconds > (tp + a2a) / hw.nvlink_bandwidth
    # replicated attention: the attention all-reduce over tensor, and the MoE block's one all-reduce over
    # tensor x expert (TP FFN and expert combine at once, as the runtime does)
    rep = Load(decode=64, group_decode=64)
    volume, _ = stage_comm_time(cfg, Layout(tensor=8, expert=8), hw, w, Options(expert_mode="replicated_attention"),
                                stage, rep)
    assert volume == pytest.approx(120 * 2 * 7 / 8 * 64 * token + 120 * 2 * 63 / 64 * 64 * token)


def test_flops_and_bytes_count_the_padded_sizes():
    """Vocabulary 32001 and expert width 14337 over TP8: the runtime stores and multiplies 32008 and 14344."""
    cfg = load_model_config("mixtral-8x7b").replace(vocab_size=32001, moe_intermediate_size=14337)
    hw, w, lay = load_hardware("h100-sxm"), Workload(precision="bf16"), Layout(tensor=8)
    load = Load(decode=8, group_decode=8, logits=8, decode_context=100)
    f = stage_features(cfg, lay, hw, w, Options(), stages(cfg, lay)[0], load)
    assert f["head_flops"] == pytest.approx(8 * 2 * 32008 * 4096 / 8)
    assert f["head_bytes"] == pytest.approx(32008 * 4096 / 8 * 2)
    assert f["moe_flops"] == pytest.approx(32 * 8 * 2 * 2 * 3 * 4096 * 14344 / 8)
    assert f["moe_width"] == 14344 / 8


def test_shared_expert_flops_split_like_its_weights():
    """The 'replicated_attention' mode splits the shared expert over tensor x expert, 'dp_attention' over tensor."""
    cfg = load_model_config("mixtral-8x7b").replace(shared_expert_intermediate_size=1000)  # padded to 1000 (TP2EP4)
    hw, w = load_hardware("h100-sxm"), Workload(precision="bf16")
    load = Load(decode=16, group_decode=16, decode_context=100)
    stage = stages(cfg, Layout())[0]
    data, rep = (stage_features(cfg, Layout(tensor=2, expert=4), hw, w, Options(expert_mode=m), stage, load)
                 for m in ("dp_attention", "replicated_attention"))
    shared = 32 * 16 * 2 * 3 * 4096 * 1000  # layers x tokens x 2 x params
    assert data["gemm_flops"] - rep["gemm_flops"] == pytest.approx(shared / 2 - shared / 8)
    assert data["gemm_bytes"] - rep["gemm_bytes"] == pytest.approx(32 * 3 * 4096 * 1000 * 2 * (1 / 2 - 1 / 8))


def test_allreduce_ring_formula():
    assert allreduce_time(8e6, 8, 1e9, 1e-6) == pytest.approx(2 * 7 / 8 * 8e6 / 1e9 + 2 * 3 * 1e-6)
    assert allreduce_time(8e6, 1, 1e9, 1e-6) == 0.0


# "How to Scale Your Model" (Austin et al., 2025), Part 8 "Serving LLaMA 3-70B"
# (https://jax-ml.github.io/scaling-book/applied-inference/): LLaMA 3-70B in int8 on a TPU v5e 4x2 (8 chips,
# 8.1e11 B/s HBM each) at batch 32 and 8192 context: KV per token 2 * 8 * 128 * 80 = 160 kB, KV caches
# 160e3 * 8192 * 32 = 41.9 GB, step T = (70e9 + 41.9e9) / (8 * 8.1e11) = 17 ms, 32 / 0.017 / 8 = 235 tok/s/chip;
# bf16 critical batch B* = 1.97e14 / 8.2e11 = 240. A dense model is a one-expert MoE to the planner.
LLAMA3_70B = dict(family="mixtral", vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                  num_kv_heads=8, head_dim=128, moe_intermediate_size=28672, num_experts=1, num_experts_per_tok=1)
V5E = Hardware(name="tpu-v5e", peak_flops={"bf16": 1.97e14, "fp8": 3.94e14}, memory_bytes=16e9,
               memory_bandwidth=8.1e11, nvlink_bandwidth=4.5e10, nvlink_latency_s=0.0, network_bandwidth=4.5e10,
               network_latency_s=0.0, devices_per_node=8, nvlink_domain=256, efficiency=IDEAL)


def test_scaling_book_llama3_70b_decode_step():
    cfg = load_model_config(LLAMA3_70B)
    w = Workload(precision="fp8", kv_precision="fp8")  # 1-byte weights and cache, as int8 in the book
    layout = Layout(tensor=8)
    assert 2 * 8 * 128 * 80 * 1 == 163_840  # the book's "160 kB" per token
    kv = 163_840 * 8192 * 32
    assert kv == pytest.approx(41.9e9, rel=0.03)
    load = Load(decode=32, group_decode=32, logits=32, decode_context=8192)
    cost = stage_cost(cfg, layout, V5E, w, Options(comm_overlap=1.0), stages(cfg, layout)[0], load)
    assert cost.t_memory > cost.t_compute  # B = 32 < B* = 120: bandwidth-bound
    # the book counts weights and KV cache only; the planner adds activation traffic (about 4% here)
    act = stage_features(cfg, layout, V5E, w, Options(), stages(cfg, layout)[0], load)["act_bytes"] / 8.1e11
    assert 0 < act < 0.05 * cost.time
    assert cost.time - act == pytest.approx(0.017, rel=0.05)
    assert 32 / (cost.time - act) / 8 == pytest.approx(235, rel=0.05)


def test_scaling_book_critical_batch_bf16():
    cfg = load_model_config(LLAMA3_70B)
    layout, stage = Layout(tensor=8), stages(cfg, Layout(tensor=8))[0]
    hw = V5E.__class__(**{**V5E.__dict__, "memory_bandwidth": 8.2e11})

    def bound(batch):  # weights only, as the book (activation traffic excluded)
        load = Load(decode=batch, group_decode=batch, decode_context=1)
        c = stage_cost(cfg, layout, hw, Workload(), Options(comm_overlap=1.0), stage, load)
        act = stage_features(cfg, layout, hw, Workload(), Options(), stage, load)["act_bytes"] / 8.2e11
        return c.t_compute >= c.t_memory - act

    first = next(b for b in range(1, 1000) if bound(b))
    assert first == pytest.approx(240, rel=0.05)  # B* = 1.97e14 / 8.2e11
