"""Cost-model formulas against hand-computed cases and the worked decode example of "How to Scale Your Model"."""

import itertools
import math

import numpy as np
import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.cost import (
    Load,
    allreduce_time,
    expert_fanout,
    expert_fanout_bound,
    layer_flops_per_token,
    stage_comm_time,
    stage_cost,
    stage_features,
)
from moejax.planner.hardware import FRACTIONS, Efficiency, Hardware, load_hardware
from moejax.planner.layout import PlanLayout
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


def _fanout_by_enumeration(e, k, ep, groups, topk_group):
    """(mean, most) distinct ranks over every choice of groups and of k experts among theirs: the uniform
    group-limited model, counted. Rank r holds experts [r e/ep, (r+1) e/ep), group g [g e/groups, ...)."""
    per_group, per_rank = e // groups, e // ep
    ranks = []
    for chosen in itertools.combinations(range(groups), topk_group):
        pool = [x for g in chosen for x in range(g * per_group, (g + 1) * per_group)]
        ranks += [len({x // per_rank for x in experts}) for experts in itertools.combinations(pool, k)]
    return sum(ranks) / len(ranks), max(ranks)


@pytest.mark.parametrize("e,k,ep,groups,topk_group,aligned", [
    (16, 2, 8, 1, 1, True),  # no groups: the plain formula
    (16, 3, 4, 4, 2, True),  # a group per rank
    (16, 3, 2, 8, 3, True),  # four groups per rank
    (16, 3, 8, 4, 2, True),  # a group over two ranks
    (24, 3, 3, 4, 2, False),  # groups of 6 across ranks of 8
    (24, 4, 6, 4, 3, False),  # groups of 6 across ranks of 4
])
def test_grouped_fanout_equals_the_enumerated_mean(e, k, ep, groups, topk_group, aligned):
    mean, most = _fanout_by_enumeration(e, k, ep, groups, topk_group)
    assert expert_fanout(e, k, ep, groups, topk_group) == pytest.approx(mean, rel=1e-12)
    bound = expert_fanout_bound(e, k, ep, groups, topk_group)
    assert most == bound if aligned else most <= bound  # groups and ranks nested: the bound is reached


def test_deepseek_v3_group_limit_bounds_the_fanout():
    """256 experts in 8 groups, 4 groups per token, top-8, EP8: each group is one rank, so a token reaches at
    most 4 ranks; in expectation 4 (1 - C(96, 8) / C(128, 8)) = 3.63 of them, against 5.29 without groups."""
    cfg = load_model_config("deepseek-v3")
    args = (cfg.num_experts, cfg.num_experts_per_tok, 8, cfg.n_group, cfg.topk_group)
    assert expert_fanout_bound(*args) == 4 and expert_fanout_bound(256, 8, 8) == 8
    grouped = expert_fanout(*args)
    assert grouped == pytest.approx(4 * (1 - math.comb(96, 8) / math.comb(128, 8)))
    assert grouped == pytest.approx(3.63, abs=0.01) and expert_fanout(256, 8, 8) == pytest.approx(5.29, abs=0.01)
    assert expert_fanout_bound(256, 8, 16, 8, 4) == 8  # a group over two ranks: the top-8 is the limit
    assert expert_fanout(256, 8, 16, 8, 4) < expert_fanout(256, 8, 16)
    assert expert_fanout(256, 8, 1, 8, 4) == pytest.approx(1.0)


def _deepseek_routing(scores_TE, n_group, topk_group, k):
    """DeepSeek-V3's group-limited top-k, naively: groups ranked by the sum of their two best scores, the best
    topk_group kept, the top-k experts among theirs."""
    t, e = scores_TE.shape
    top2_TG = np.sort(scores_TE.reshape(t, n_group, e // n_group), axis=-1)[..., -2:].sum(-1)
    keep_TG = np.zeros((t, n_group), bool)
    np.put_along_axis(keep_TG, np.argsort(-top2_TG, axis=-1)[:, :topk_group], True, axis=1)
    masked_TE = np.where(np.repeat(keep_TG, e // n_group, axis=1), scores_TE, -np.inf)
    return np.argsort(-masked_TE, axis=-1)[:, :k]


@pytest.mark.parametrize("ep", [8, 16, 64])
def test_grouped_fanout_against_the_router_on_random_scores(ep):
    """The uniform model (groups, then experts among theirs, uniformly) against DeepSeek-V3's router on i.i.d.
    random scores: the router spreads a token's experts over its chosen groups a little more (a chosen group has
    high top-2 scores), so the model is low, by less than 10% (3.63 against 3.95 at EP8), and under the bound."""
    experts_TX = _deepseek_routing(np.random.default_rng(0).random((20_000, 256)), 8, 4, 8)
    ranks_TX = np.sort(experts_TX // (256 // ep), axis=-1)
    measured = float(np.mean(1 + np.sum(np.diff(ranks_TX, axis=-1) != 0, axis=-1)))
    model = expert_fanout(256, 8, ep, 8, 4)
    assert model < measured < 1.1 * model and measured <= expert_fanout_bound(256, 8, ep, 8, 4)


def test_all_to_all_volume_uses_the_group_limited_fanout():
    cfg, hw = load_model_config("deepseek-v3"), _ideal(load_hardware("h200"))
    lay, load = Layout(expert=8), Load(decode=64, group_decode=8)
    stage = stages(cfg, lay)[0]
    volume, _ = stage_comm_time(cfg, lay, hw, Workload(), Options(), stage, load)
    token = 7168 * 2  # bf16 activations; TP1: no all-reduce, only dispatch and combine
    assert volume == pytest.approx(58 * 2 * 8 * token * expert_fanout(256, 8, 8, 8, 4) * 7 / 8)
    ungrouped, _ = stage_comm_time(cfg.replace(n_group=1, topk_group=1), lay, hw, Workload(), Options(), stage, load)
    assert volume / ungrouped == pytest.approx(expert_fanout(256, 8, 8, 8, 4) / expert_fanout(256, 8, 8))


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


def test_mla_down_projections_are_replicated_over_tensor():
    """DeepSeek-V3 at TP8: q_a (D x 1536) and kv_a (D x 576) belong to no head, so every TP rank computes and
    reads them whole; the rest of attention, the dense FFNs and the shared expert split 8 ways."""
    cfg, hw, w = load_model_config("deepseek-v3"), load_hardware("h200"), Workload(precision="bf16")
    lay, load = Layout(tensor=8), Load(decode=8, group_decode=8, decode_context=100)
    stage = stages(cfg, lay)[0]
    f = stage_features(cfg, lay, hw, w, Options(), stage, load)
    pc = param_counts(cfg)
    latent = 7168 * (1536 + 512 + 64)
    assert pc.attention_latent == latent
    flops = 8 * 2 * (61 * ((pc.attention - latent) / 8 + latent) + (3 * pc.dense_ffn + 58 * pc.shared) / 8
                     + 58 * pc.router)
    assert f["gemm_flops"] == pytest.approx(flops)
    weights = 61 * ((pc.attention - latent) / 8 + latent) + (3 * pc.dense_ffn + 58 * pc.shared) / 8
    assert f["gemm_bytes"] == pytest.approx(weights * 2 + 58 * pc.router * 2)


def test_dense_ffn_all_reduce_follows_the_expert_mode():
    """GLM-4.5-Air TP2EP4: its dense first layer all-reduces over tensor with attention data-parallel, over the
    whole group of 8 with attention replicated (the MoE blocks too, there)."""
    cfg, hw = load_model_config("glm-4.5-air"), _ideal(load_hardware("h200"))
    lay, stage, token = Layout(tensor=2, expert=4), stages(cfg, Layout())[0], 4096 * 2
    rep = Load(decode=16, group_decode=16)
    volume, _ = stage_comm_time(cfg, lay, hw, Workload(), Options(expert_mode="replicated_attention"), stage, rep)
    assert volume == pytest.approx(46 * 2 * 1 / 2 * 16 * token + (45 + 1) * 2 * 7 / 8 * 16 * token)
    data = Load(decode=16, group_decode=4)
    volume, _ = stage_comm_time(cfg, lay, hw, Workload(), Options(), stage, data)
    a2a = 2 * 45 * 4 * token * expert_fanout(128, 8, 4) * 3 / 4
    assert volume == pytest.approx((46 + 1 + 45) * 2 * 1 / 2 * 4 * token + a2a)


@pytest.mark.parametrize("layout,x,y,z,w", [("TP8MTP1EP8", 1, 8, 1, 1), ("TP4MTP1EP8", 1, 4, 1, 2),
                                             ("TP2MTP4EP2", 2, 1, 2, 2), ("TP1MTP2EP4", 1, 1, 2, 4),
                                             ("TP2MTP4EP1", 2, 1, 2, 1), ("TP4MTP2EP2", 2, 2, 1, 1)])
def test_split_layout_collectives_are_the_runtime_s(layout, x, y, z, w):
    """Mixtral-8x7B (32 MoE layers), 8 decode tokens per attention group, bf16, split layouts: an all-reduce over
    attention TP t = x y after attention and another closing each MoE block; where z > 1 an all-gather of the
    group's tokens over z and a reduce-scatter back (2 (z-1) messages on the wire); where w > 1 the all-to-all
    over EP = y w of each device's z / y share of the gathered tokens (`moejax.sharding.Parallelism`)."""
    cfg, hw = load_model_config("mixtral-8x7b"), _ideal(load_hardware("h200"))
    lay = PlanLayout.of(layout)
    assert lay.layout.split_factors == (x, y, z, w)
    t, e, msg = x * y, lay.expert, 8 * 4096 * 2
    volume, _ = stage_comm_time(cfg, lay, hw, Workload(), Options(), stages(cfg, lay)[0],
                                Load(decode=8 * lay.attention_data, group_decode=8))
    tp = 2 * 32 * 2 * (t - 1) / t * msg
    gather = 32 * 2 * (z - 1) * msg
    a2a = 32 * 2 * msg * z / y * expert_fanout(8, 2, e) * (e - 1) / e if w > 1 else 0.0
    assert volume == pytest.approx(tp + gather + a2a)


def test_runtime_layouts_need_no_gather():
    """A runtime layout's MoE tensor split is attention's: no gather, whatever the expert mode."""
    cfg, hw = load_model_config("mixtral-8x7b"), load_hardware("h200")
    stage, load = stages(cfg, Layout())[0], Load(decode=16, group_decode=4)
    for mode in ("dp_attention", "replicated_attention"):
        f = stage_features(cfg, Layout(tensor=2, expert=4), hw, Workload(), Options(expert_mode=mode), stage, load)
        assert f["gather_count"] == f["gather_wire"] == 0 and f["tp_count"] > 0


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
