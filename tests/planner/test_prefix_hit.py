"""Prefix caching in the serving model: a hit rate h scales the prefill work by (1 - h), nothing else."""

import dataclasses
import json
import math
import re

import pytest

from moejax.config import load_model_config
from moejax.planner import calibrate, cli
from moejax.planner.cost import stage_features
from moejax.planner.hardware import load_hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import stages
from moejax.planner.serving import evaluate, features, predict, round_loads, steady_state
from moejax.planner.workload import Options, Workload

CFG, HW = load_model_config("mixtral-8x22b"), load_hardware("h100-sxm")
LONG = Workload(isl=8192, osl=128, precision="fp8")  # prefill-heavy: 64 prompt tokens per output token
RATES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


def _hit(h: float, workload: Workload = LONG) -> Workload:
    return dataclasses.replace(workload, prefix_hit_rate=h)


def _loads(workload: Workload, layout: str = "TP8", batch: int = 32, chunk: int = 1024):
    return round_loads(CFG, PlanLayout.of(layout), workload, Options(), batch, chunk)


def _prefill_only(load):
    return dataclasses.replace(load, decode=0.0, group_decode=0.0, logits=0.0)


@pytest.mark.parametrize("layout,batch,chunk,isl", [("TP8", 32, 1024, 8192), ("TP4PP2", 64, 512, 1024),
                                                    ("EP8", 8, 2048, 100)])
def test_zero_hit_rate_is_the_model_without_caching(layout, batch, chunk, isl):
    """At h = 0 every quantity the hit rate enters is today's formula, bit for bit, and so is every figure."""
    w = Workload(isl=isl, osl=128, precision="fp8")
    zero = dataclasses.replace(w, prefix_hit_rate=0.0)
    assert zero.prefill_tokens == isl and zero.cached_tokens == 0
    state, _, mixed, _, m = _loads(zero, layout, batch, chunk)
    piece = min(chunk, isl)
    groups = PlanLayout.of(layout).attention_data
    assert state == steady_state(batch / groups / m, chunk, isl, w.osl)
    assert mixed.prefill_context == (isl + 1) / 2.0 and mixed.prefix == (isl - piece) / 2.0
    f = features(CFG, layout, HW, zero, Options(), batch, chunk)
    assert float(f["service_turns"]) == isl / piece
    assert predict(CFG, layout, HW, zero, batch=batch, chunk=chunk) == predict(CFG, layout, HW, w, batch=batch,
                                                                               chunk=chunk)


@pytest.mark.parametrize("h", RATES[1:])
def test_prefill_work_scales_by_the_miss_rate(h):
    """Computed prompt tokens and the linear layers' prefill FLOPs scale by 1 - h; the computed tokens sit after the
    cached ones and attend over the whole prompt up to themselves, and each chunk reads the cached prefix."""
    w = _hit(h)
    assert w.prefill_tokens == pytest.approx((1 - h) * w.isl) and w.cached_tokens == pytest.approx(h * w.isl)
    # Per request over a steady-state cycle of the 32 requests (prefill and decode turns).
    state, _, mixed, _, m = _loads(w)
    cycle = state.prefill_rounds + w.osl - 1
    assert state.prefill * cycle / (32 / m) == pytest.approx((1 - h) * w.isl)
    # One request, one chunk for its whole prompt: prefill FLOPs of the linear layers scale by 1 - h exactly.
    stage = stages(CFG, PlanLayout.of("TP8"))[0]
    one = [_prefill_only(_loads(x, batch=1, chunk=8192)[2]) for x in (LONG, w)]
    assert one[1].group_prefill == pytest.approx((1 - h) * one[0].group_prefill)
    base, hit = (stage_features(CFG, "TP8", HW, x, Options(), stage, load) for x, load in zip((LONG, w), one,
                                                                                             strict=True))
    for key in ("gemm_flops", "moe_flops", "act_bytes"):
        assert hit[key] == pytest.approx((1 - h) * base[key], rel=1e-9), key
    # Attention: the context of a computed token is its position, cached prefix included.
    cached, computed = w.cached_tokens, w.prefill_tokens
    assert one[1].prefill_context == pytest.approx((cached + 1 + w.isl) / 2)  # mean over positions cached+1 .. isl
    assert one[1].prefix == pytest.approx(cached)  # its one chunk reads the whole cached prefix
    assert hit["attn_flops"] / one[1].group_prefill > base["attn_flops"] / one[0].group_prefill
    assert mixed.prefix == pytest.approx(cached + (computed - min(1024, computed)) / 2)


def test_ttft_falls_and_throughput_rises_with_the_hit_rate():
    """Prefill-heavy workloads: fewer chunks per prompt, so TTFT falls strictly and tokens/s/device rises."""
    for layout, batch, chunk in (("TP8", 32, 1024), ("TP4PP2", 64, 512), ("TP8", 4, 8192)):
        runs = [predict(CFG, layout, HW, _hit(h), batch=batch, chunk=chunk) for h in RATES]
        ttft = [p.ttft_s for p in runs]
        assert all(a > b for a, b in zip(ttft, ttft[1:], strict=False)), (layout, ttft)
        tps = [p.tokens_per_s_per_device for p in runs]
        assert all(a < b for a, b in zip(tps, tps[1:], strict=False)), (layout, tps)
        turns = [float(features(CFG, layout, HW, _hit(h), Options(), batch, chunk)["prefill_turns"]) for h in RATES]
        assert all(a >= b for a, b in zip(turns, turns[1:], strict=False))
        assert turns[-1] < turns[0] or turns[0] == 1  # one turn per prompt already: only the turn gets lighter


def test_decode_and_memory_do_not_see_the_hit_rate():
    """A decode-only turn costs the same at any h (the cached tokens are still in the cache and read), as does
    memory; where prefill fits one turn (the decode load per turn unchanged), the decode tick is the same and TPOT
    only gains from lighter mixed turns."""
    stage = stages(CFG, PlanLayout.of("TP8"))[0]
    decode = _loads(LONG)[3]
    base = stage_features(CFG, "TP8", HW, LONG, Options(), stage, decode)
    ticks, tpots = [], []
    for h in RATES:
        assert stage_features(CFG, "TP8", HW, _hit(h), Options(), stage, decode) == base
        assert _loads(_hit(h), batch=4, chunk=8192)[3] == _loads(LONG, batch=4, chunk=8192)[3]
        r = evaluate(features(CFG, "TP8", HW, _hit(h), Options(), 4, 8192), HW.efficiency.as_dict())
        ticks.append(float(r["tick_decode_s"]))
        tpots.append(float(r["tpot_s"]))
        p, p0 = (predict(CFG, "TP8", HW, w, batch=32, chunk=1024) for w in (_hit(h), LONG))
        assert p.mem_per_device_bytes == p0.mem_per_device_bytes and p.feasible == p0.feasible
    assert len(set(ticks)) == 1
    assert all(a > b for a, b in zip(tpots, tpots[1:], strict=False))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.5", None, True])
def test_bad_hit_rates_are_refused(bad):
    with pytest.raises(ValueError, match=r"prefix_hit_rate must be a number in \[0, 1\).*got " + re.escape(repr(bad))):
        Workload(prefix_hit_rate=bad)


def test_calibration_rows_carry_the_hit_rate():
    row = {"model": "mixtral-8x22b", "hardware": "h100-sxm", "layout": "TP8", "precision": "fp8", "batch_size": 32,
           "chunk_size": 1024, "isl": 8192, "osl": 128, "prefix_hit_rate": 0.5}
    got = calibrate.predict_measurement(row, HW, Options())
    assert got == predict(CFG, "TP8", HW, _hit(0.5), batch=32, chunk=1024)


def _plan(tmp_path, *extra: str) -> list[str]:
    return ["--model", "qwen3-30b-a3b", "--hardware", "h200", "--devices", "8", "--layouts", "TP8,EP8", "--isl",
            "8192", "--osl", "128", "--batch-sizes", "8,64", "--chunk-sizes", "1024", "--out", str(tmp_path),
            "--no-plot", *extra]


def test_plan_flag(tmp_path, capsys):
    """--prefix-hit-rate H reaches the workload: every configuration's TTFT falls, memory stays; the summary names
    it; a value outside [0, 1) is a one-line error."""
    runs = {}
    for h in ("0", "0.8"):
        assert cli.main(_plan(tmp_path / h, "--json-full", "--prefix-hit-rate", h)) == 0
        runs[h] = json.loads(capsys.readouterr().out)
    assert runs["0.8"]["workload"]["prefix_hit_rate"] == 0.8 and runs["0"]["workload"]["prefix_hit_rate"] == 0.0
    pairs = list(zip(runs["0"]["configs"], runs["0.8"]["configs"], strict=True))
    assert pairs and all(b["ttft_s"] < a["ttft_s"] for a, b in pairs)
    assert all(b["mem_per_device_bytes"] == a["mem_per_device_bytes"] for a, b in pairs)
    assert cli.main(_plan(tmp_path / "s", "--prefix-hit-rate", "0.8")) == 0
    assert "isl 8192, osl 128, prefix hit rate 0.8, expert mode" in capsys.readouterr().out
    assert cli.main(_plan(tmp_path / "d")) == 0
    assert "prefix hit rate" not in capsys.readouterr().out
    for bad in ("1", "-0.1", "nan", "abc"):
        assert cli.main(_plan(tmp_path / "bad", "--prefix-hit-rate", bad)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moejax: error: argument --prefix-hit-rate: must be a number in [0, 1)"), err
        assert f"got {bad!r}" in err and "\n" not in err
