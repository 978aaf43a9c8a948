"""Calibration: a synthetic measurement file generated from the model with known factors is fitted back."""

import itertools
import json

import pytest

from moejax.mesh import Layout
from moejax.planner.calibrate import (
    fit_efficiency,
    format_errors,
    predict_measurement,
    prediction_errors,
    read_measurements,
    save_efficiency,
)
from moejax.planner.hardware import Efficiency, load_hardware

TRUE = Efficiency(compute=0.45, memory=0.65, network=0.5, step_overhead_s=5e-4)


def _write_measurements(path):
    hw = load_hardware("h100-sxm").with_efficiency(TRUE)
    rows = []
    for layout, batch, chunk in itertools.product(["TP1", "TP8", "TP2EP4", "DP2TP4EP4", "TP4EP8"], [1, 64],
                                                  [256, 4096]):
        row = dict(model="mixtral-8x7b", hardware="h100-sxm", layout=layout, precision="bf16",
                   batch_size=batch * Layout.parse(layout).data, chunk_size=chunk, isl=2048, osl=128,
                   ep_attention="data", note="synthetic")
        p = predict_measurement(row, hw)
        row.update(ttft_s=p.ttft_s, tpot_s=p.tpot_s, tokens_per_s_per_device=p.tokens_per_s_per_device,
                   tokens_per_s_per_user=p.tokens_per_s_per_user)
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {predict_measurement(r, hw).bound for r in rows}


def test_fit_recovers_known_efficiency(tmp_path):
    bounds = _write_measurements(tmp_path / "runs.jsonl")
    assert {"compute", "memory", "comm"} <= bounds  # every factor is exercised
    rows = read_measurements(tmp_path / "runs.jsonl")
    start = load_hardware("h100-sxm")
    before = prediction_errors(rows, start)
    assert max(abs(e["tpot_s"]["rel_error"]) for e in before) > 0.2
    fitted, loss = fit_efficiency(rows, start)
    for name in ("compute", "memory", "network", "step_overhead_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.02)
    assert loss < 1e-6
    after = prediction_errors(rows, start.with_efficiency(fitted))
    assert max(abs(e[m]["rel_error"]) for e in after for m in ("ttft_s", "tpot_s")) < 0.01
    assert "tokens_per_s_per_device" in format_errors(after)


def test_saved_factors_are_reused(tmp_path):
    path = save_efficiency(TRUE, tmp_path / "h100.yaml", hardware="h100-sxm", loss=0.0, measurements=20)
    hw = load_hardware("h100-sxm", efficiency=path)
    assert hw.efficiency == TRUE


def test_measurement_schema_is_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"model": "mixtral-8x7b", "layout": "TP2"}) + "\n")
    with pytest.raises(ValueError, match="missing keys"):
        read_measurements(bad)
