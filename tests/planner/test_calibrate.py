"""Calibration: synthetic measurements generated with known efficiency curves are fitted back by optax."""

import dataclasses
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

START = load_hardware("h100-sxm").efficiency
TRUE = dataclasses.replace(START, compute=0.6, grouped=0.3, memory=0.7, network=0.3, kernel_s=5e-6,
                           step_overhead_s=5e-4)
FITTED = ("compute", "grouped", "memory", "network", "kernel_s", "step_overhead_s")


def _write_measurements(path):
    hw = load_hardware("h100-sxm").with_efficiency(TRUE)
    rows = []
    for model, layout, batch, chunk in itertools.product(["mixtral-8x7b", "qwen3-30b-a3b"],
                                                         ["TP1", "TP8", "TP2EP4", "DP2TP4EP2", "TP2PP2"],
                                                         [1, 16, 256], [256, 4096]):
        row = dict(model=model, hardware="h100-sxm", layout=layout, precision="bf16",
                   batch_size=batch * Layout.parse(layout).data, chunk_size=chunk, isl=2048, osl=128,
                   expert_mode="dp_attention", note="synthetic")
        p = predict_measurement(row, hw)
        row.update(ttft_s=p.ttft_s, tpot_s=p.tpot_s, tokens_per_s_per_device=p.tokens_per_s_per_device,
                   tokens_per_s_per_user=p.tokens_per_s_per_user)
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preds = [predict_measurement(r, hw) for r in rows]
    return {p.bound for p in preds} | {"comm" for p in preds if p.t_comm_s > 0.2 * p.tpot_s}


def test_fit_recovers_known_efficiency(tmp_path):
    bounds = _write_measurements(tmp_path / "runs.jsonl")
    assert {"compute", "memory", "comm"} <= bounds  # every fitted curve is exercised
    rows = read_measurements(tmp_path / "runs.jsonl")
    start = load_hardware("h100-sxm")
    before = prediction_errors(rows, start)
    assert max(abs(e["tpot_s"]["rel_error"]) for e in before) > 0.2
    fitted, loss = fit_efficiency(rows, start, factors=FITTED, max_iter=1500)
    for name in FITTED:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    assert loss < 1e-4
    after = prediction_errors(rows, start.with_efficiency(fitted))
    assert max(abs(e[m]["rel_error"]) for e in after for m in ("ttft_s", "tpot_s")) < 0.03
    assert "tokens_per_s_per_device" in format_errors(after)


def test_saved_factors_are_reused(tmp_path):
    path = save_efficiency(TRUE, tmp_path / "h100.yaml", hardware="h100-sxm", loss=0.0, measurements=20)
    hw = load_hardware("h100-sxm", efficiency=path)
    assert hw.efficiency == TRUE


def test_old_four_factor_files_still_load(tmp_path):
    (tmp_path / "old.yaml").write_text("efficiency: {compute: 0.5, memory: 0.6, network: 0.4, step_overhead_s: 1e-3}\n")
    hw = load_hardware("h200", efficiency=tmp_path / "old.yaml")
    assert (hw.efficiency.compute, hw.efficiency.step_overhead_s) == (0.5, 1e-3)
    assert hw.efficiency.grouped == load_hardware("h200").efficiency.grouped  # the rest: the hardware file's
    with pytest.raises(ValueError, match="must lie in"):
        Efficiency(compute=2.0)


def test_measurement_schema_is_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"model": "mixtral-8x7b", "layout": "TP2"}) + "\n")
    with pytest.raises(ValueError, match="missing keys"):
        read_measurements(bad)


def test_disaggregated_rows_are_left_out_and_counted(tmp_path, capsys):
    _write_measurements(tmp_path / "runs.jsonl")
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    disagg = {**json.loads(lines[0]), "prefill_layout": "TP2", "layout": "DP2EP2"}
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines + [json.dumps(disagg)]) + "\n")
    rows = read_measurements(tmp_path / "mixed.jsonl")
    assert rows == read_measurements(tmp_path / "runs.jsonl") and len(rows) == len(lines)
    assert "left out 1 disaggregated row(s)" in capsys.readouterr().err
