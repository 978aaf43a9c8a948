"""Properties the predictions must have, whatever the efficiency factors."""

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.hardware import load_hardware
from moejax.planner.serving import predict, steady_state
from moejax.planner.sweep import pareto_frontier, plan, rank
from moejax.planner.workload import Options, Workload


@pytest.mark.parametrize("base", ["TP4", "TP2EP4", "EP8PP2", "TP2EP2PP2"])
@pytest.mark.parametrize("mode", ["dp_attention", "replicated_attention"])
def test_data_parallelism_never_changes_latency(base, mode):
    cfg, hw = load_model_config("mixtral-8x22b"), load_hardware("h100-sxm")
    w, options = Workload(isl=2048, osl=128, precision="fp8"), Options(expert_mode=mode)
    one = predict(cfg, base, hw, w, options, batch=16, chunk=1024)
    for dp in (2, 4, 8):
        many = predict(cfg, f"DP{dp}{base}", hw, w, options, batch=16, chunk=1024)
        assert (many.ttft_s, many.tpot_s) == (one.ttft_s, one.tpot_s)
        assert many.tokens_per_s_per_device == pytest.approx(one.tokens_per_s_per_device)
        assert many.batch_size == dp * one.batch_size


def test_tpot_at_batch_one_falls_with_tp_until_communication_dominates():
    cfg, hw = load_model_config("qwen3-235b-a22b"), load_hardware("h100-sxm")
    w = Workload(isl=1024, osl=256, precision="fp8")
    preds = [predict(cfg, Layout(tensor=t), hw, w, batch=1, chunk=1024) for t in (1, 2, 4, 8, 16, 32, 64)]
    tpot = [p.tpot_s for p in preds]
    best = tpot.index(min(tpot))
    assert best >= 2  # TP helps at first
    assert all(a > b for a, b in zip(tpot[:best], tpot[1:best + 1], strict=True))  # strictly falling up to the best TP
    assert preds[0].bound == "memory"
    assert all(p.t_comm_s > p.t_memory_s for p in preds[best + 1:])  # past the best, communication dominates
    assert tpot[-1] > tpot[best]


def test_larger_chunk_lowers_ttft_and_raises_tpot():
    cfg, hw = load_model_config("mixtral-8x7b"), load_hardware("h100-sxm")
    w = Workload(isl=4096, osl=256)
    preds = [predict(cfg, "TP4", hw, w, batch=32, chunk=c) for c in (256, 1024, 4096)]
    assert preds[0].ttft_s > preds[1].ttft_s > preds[2].ttft_s
    assert preds[0].tpot_s < preds[1].tpot_s < preds[2].tpot_s


def test_steady_state_conserves_tokens():
    s = steady_state(requests=64, chunk=512, isl=1024, osl=129)
    assert s.prefill / s.decode == pytest.approx(1024 / 128)  # every request: isl prefill, osl - 1 decode tokens
    assert s.prefill <= 512
    queued = steady_state(requests=1024, chunk=512, isl=1024, osl=129)
    assert queued.prefill == pytest.approx(512)  # chunk budget saturated: requests queue
    assert queued.prefill_rounds == pytest.approx(1024 * 1024 / 512 - 128)


def test_infeasible_configuration_is_never_ranked():
    cfg, hw = load_model_config("gpt-moe-1800b"), load_hardware("h100-sxm")
    result = plan(cfg, hw, 32, Workload(precision="fp8"), target_tps_user=0)
    infeasible = [p for p in result.predictions if not p.feasible]
    assert infeasible and result.ranking
    assert all(p.feasible for p in result.ranking + result.pareto)
    # the filter matters: some configurations that do not fit would otherwise win
    assert max(p.tokens_per_s_per_device for p in infeasible) > result.ranking[0].tokens_per_s_per_device
    assert all("GiB per device" in p.reason for p in infeasible)


def test_pareto_frontier_is_undominated():
    cfg, hw = load_model_config("mixtral-8x7b"), load_hardware("h100-sxm")
    result = plan(cfg, hw, 8, Workload(), batches=(1, 8, 64, 256), chunks=(512, 2048))
    front = result.pareto
    feasible = [p for p in result.predictions if p.feasible]
    for f in front:
        assert not any(p.tokens_per_s_per_device > f.tokens_per_s_per_device
                       and p.tokens_per_s_per_user > f.tokens_per_s_per_user for p in feasible)
    users = [p.tokens_per_s_per_user for p in front]
    devices = [p.tokens_per_s_per_device for p in front]
    assert users == sorted(users) and devices == sorted(devices, reverse=True)
    assert pareto_frontier(front) == front
    ranked = rank(result.predictions, target_tps_user=50)
    assert all(p.tokens_per_s_per_user >= 50 for p in ranked)
    assert len({p.layout for p in ranked}) == len(ranked)
