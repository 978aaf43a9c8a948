"""The runtime's pipeline schedule, queueing and memory placement, as the planner models them."""

import math

import numpy as np
import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.cost import op_times, sat
from moejax.planner.hardware import load_hardware
from moejax.planner.memory import param_counts, stage_weight_bytes, stages
from moejax.planner.serving import evaluate, features, predict
from moejax.planner.workload import Options, Workload

CFG, HW = load_model_config("mixtral-8x22b"), load_hardware("h100-sxm")
W = Workload(isl=1024, osl=128, precision="fp8")


def _run(layout, batch, chunk=1024, options=None, workload=W):
    f = features(CFG, layout, HW, workload, options or Options(), batch, chunk)
    return f, evaluate(f, HW.efficiency.as_dict())


@pytest.mark.parametrize("layout,m", [("TP4PP2", None), ("TP2PP4", None), ("TP2PP4", 2), ("TP2PP4", 8)])
def test_ticks_make_tpot_and_ttft(layout, m):
    """TPOT = P x mean tick, P = max(M, S); TTFT = ((n - 1) P + S) x mixed tick (chunks enter every P ticks)."""
    f, r = _run(layout, 64, options=Options(microbatches=m))
    s, mb = int(f["stages"]), int(f["microbatches"])
    assert mb == (m or s) and int(f["period"]) == max(mb, s)
    fm, p, n = float(f["mixed_fraction"]), max(mb, s), float(f["prefill_turns"])
    assert r["tpot_s"] == pytest.approx(p * (fm * r["tick_mixed_s"] + (1 - fm) * r["tick_decode_s"]))
    assert r["ttft_s"] == pytest.approx(((n - 1) * p + s) * r["tick_mixed_s"])


def test_tick_is_the_slowest_stage_plus_send_and_step():
    """Uneven stages (56 layers over 3 stages: 19, 19, 18): the tick is the slowest stage's."""
    f, r = _run("TP4PP3", 32)
    assert [s.layers for s in stages(CFG, Layout(tensor=4, stage=3))] == [19, 19, 18]
    eff = HW.efficiency.as_dict()
    t = op_times(f, eff)
    stage = (t["roofline"] + t["comm"] + t["kernels"]) * f["valid"]
    send = f["send_bytes"] / (f["send_bw"] * eff["network"] * sat(f["send_bytes"], eff["network_bytes"]))
    send += f["send_lat"] + eff["collective_s"]
    expect = stage.max(axis=-1) + send + eff["step_overhead_s"]
    assert (r["tick_mixed_s"], r["tick_decode_s"]) == pytest.approx(tuple(expect), rel=1e-6)
    # a decode tick sends one group's decoding rows (32 / 3 requests, 127 of 128 turns decoding) x D, whole copy
    assert f["send_bytes"][1] == pytest.approx(32 / 3 * 127 / 128 * 6144 * 2)


def test_pipeline_ttft_grows_with_stages_and_is_the_crossing_time():
    preds = [predict(CFG, f"TP2PP{s}", HW, W, batch=1, chunk=1024) for s in (1, 2, 4, 8)]
    ttft = [p.ttft_s for p in preds]
    assert ttft == sorted(ttft) and len(set(ttft)) == 4
    f, r = _run("TP2PP4", 1)
    assert r["ttft_s"] == pytest.approx(4 * r["tick_mixed_s"])  # one chunk: crosses 4 stages, not 1 tick


def test_fewer_groups_than_stages_leave_a_bubble():
    full = predict(CFG, "TP2PP4", HW, W, batch=64, chunk=1024)
    one = predict(CFG, "TP2PP4", HW, W, Options(microbatches=1), batch=64, chunk=1024)
    two = predict(CFG, "TP2PP4", HW, W, Options(microbatches=2), batch=64, chunk=1024)
    assert (full.microbatches, full.bubble, two.bubble, one.bubble) == (4, 0.0, 0.5, 0.75)
    assert one.tokens_per_s_per_device < two.tokens_per_s_per_device < full.tokens_per_s_per_device
    assert predict(CFG, "TP2PP4", HW, W, batch=2, chunk=1024).microbatches == 2  # never more groups than requests


def test_more_groups_than_stages_keep_stages_busy_but_a_token_waits_m_ticks():
    f4, r4 = _run("TP2PP4", 64, options=Options(microbatches=4))
    f8, r8 = _run("TP2PP4", 64, options=Options(microbatches=8))
    assert r8["tick_decode_s"] < r4["tick_decode_s"]  # half the rows per tick
    assert r8["tpot_s"] == pytest.approx(8 * (float(f8["mixed_fraction"]) * r8["tick_mixed_s"]
                                              + (1 - float(f8["mixed_fraction"])) * r8["tick_decode_s"]))


def test_queueing_ttft_grows_with_arrival_rate():
    base = predict(CFG, "TP8", HW, W, batch=32, chunk=1024)
    rates = (1.0, 5.0, 10.0, 20.0)  # the prefill budget serves about 25 requests/s
    ttft = [predict(CFG, "TP8", HW, Workload(isl=1024, osl=128, precision="fp8", arrival_rate=r), batch=32,
                    chunk=1024).ttft_s for r in rates]
    assert base.ttft_s < ttft[0] < ttft[1] < ttft[2] < ttft[3]
    f, r = _run("TP8", 32, workload=Workload(isl=1024, osl=128, precision="fp8", arrival_rate=10.0))
    service = r["tick_mixed_s"]  # one 1024-token chunk per turn, one turn per tick
    rho = 10.0 * service
    assert r["ttft_s"] - base.ttft_s == pytest.approx(service / 2 + rho * service / (2 * (1 - rho)), rel=1e-6)
    saturated = predict(CFG, "TP8", HW, Workload(isl=1024, osl=128, precision="fp8", arrival_rate=1e4), batch=32,
                        chunk=1024)
    assert math.isinf(saturated.ttft_s)  # more arrivals than the prefill budget serves


def test_embedding_and_lm_head_on_every_stage():
    cfg = load_model_config("mixtral-8x7b")
    layout, pc = Layout(tensor=2, stage=4), param_counts(load_model_config("mixtral-8x7b"))
    per_stage = [stage_weight_bytes(cfg, layout, Workload(), s) for s in stages(cfg, layout)]
    by_hand = 8 * (pc.attention + 8 * pc.expert) / 2 * 2.0 + 8 * pc.router * 2.0 + 2 * 32000 * 4096 / 2 * 2.0
    assert per_stage == pytest.approx([by_hand] * 4)  # both tables, split over tensor, on each of the 4 stages


def test_breakdown_is_finite_and_positive():
    f, r = _run("TP2EP4PP2", 128)
    assert all(np.isfinite(v) and v >= 0 for v in r.values())
