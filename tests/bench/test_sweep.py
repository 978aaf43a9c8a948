"""Layout sweep on 8 simulated CPU devices: greedy tokens equal the 1-device run's, JSON lines the planner's
calibration loader accepts, collectives read from the compiled HLO against closed forms and the planner,
resume, failures recorded, plots with a legend entry and a distinct style per layout.

The default suite sweeps DP1 (the reference) and three 8-device layouts (SUBSET), and three split layouts
(SPLIT: the MoE split apart from attention) beside a runtime one; the `slow` studies sweep every valid 8-device
layout in every expert mode the runtime has, and every 8-device layout the planner plans with `--split-moe`.
"""

from __future__ import annotations

import csv
import json

import pytest

import moejax
from moejax.bench import plots, sweep
from moejax.bench.serve import Collector, serve
from moejax.bench.workload import Workload
from moejax.mesh import Layout
from moejax.planner.calibrate import predict_measurement, prediction_errors, read_measurements
from moejax.planner.hardware import load_hardware
from tests.bench.conftest import MODEL, SUBSET, WORKLOAD, spec_for

D, LAYERS, BYTES = 128, 4, 4  # tiny-moe: hidden size, layers; float32
MODES = ("dp_attention", "replicated_attention")
# Split layouts: attention TP becomes expert parallelism (tokens exchanged); requests split over the MoE's TP
# group (tokens gathered, then exchanged); pipeline stages with the MoE on attention's tensor group.
SPLIT = ("TP4MTP1EP8", "TP2MTP4EP2", "TP2MTP1EP2PP2")


def _check_tokens(res, rows):
    ref = res.outputs[sweep.key_of(rows[0])]
    assert rows[0]["layout"] == "DP1" and rows[0]["devices"] == 1
    assert len(ref) == WORKLOAD.num_requests and all(len(o) == 4 for o in ref)
    assert len({tuple(o) for o in ref}) > 1  # the prompts differ, and so do the continuations
    for row in rows:
        assert res.outputs[sweep.key_of(row)] == ref, row["layout"]
        assert row["tokens_match_reference"] is True and row["output_digest"] == rows[0]["output_digest"]


def _check_comm(row):
    """Collectives of the compiled decode step and prefill chunk against closed forms and the planner.

    With stages the step is one pipeline tick (microbatches default to the stages): a device runs its
    own stage's layers and sends its microbatch's activations once."""
    layout = Layout.parse(row["layout"])
    t, e, s = layout.tensor, layout.expert, layout.stage
    layers = -(-LAYERS // s)  # one stage's (padded) layers per tick
    for phase in ("decode", "prefill"):
        hlo, plan = row["comm"][phase], row["planner_comm"][phase]
        act = row["comm_tokens"][phase] * D * BYTES  # activations of one batch shard's tokens (one microbatch)
        assert hlo["weight_moves"] == [] and hlo["unknown_trip_counts"] == 0
        attn = hlo["by_scope"].get("attn", 0.0)
        assert attn == pytest.approx(layers * 2 * (t - 1) / t * act)  # one all-reduce over tensor per layer
        assert plan["tensor"] == pytest.approx(2 * attn)  # the planner: attention + FFN all-reduce per layer
        sends = hlo["by_kind"]["collective-permute"]
        assert (sends["count"], sends["wire_bytes"]) == (min(s - 1, 1), pytest.approx(min(s - 1, 1) * act))
        assert plan["send"] == pytest.approx(sends["wire_bytes"])  # every rank sends its whole copy, once a tick
        moe = hlo["by_scope"].get("moe", 0.0)
        if row["expert_mode"] == "replicated_attention":
            # one all-reduce over tensor x expert per layer, in the runtime and in the planner
            assert moe == pytest.approx(layers * 2 * (t * e - 1) / (t * e) * act)
            assert moe == pytest.approx(plan["tensor"] / 2 + plan["expert"])  # collective for collective
        elif e > 1:  # "dp_attention": tokens exchanged with the expert shards
            assert hlo["by_kind"]["all-to-all"]["count"] > 0 and plan["expert"] > 0
        if layout.size == layout.data:
            assert hlo["wire_bytes"] < 8  # data-parallel only: at most a flag reduced across shards


def test_subset_sweep_tokens_calibration_and_comm(subset_sweep):
    spec, out, res = subset_sweep
    rows = res.rows
    assert [r["layout"] for r in rows] == ["DP1", *SUBSET] and res.measured == 4 and not res.failures
    _check_tokens(res, rows)
    for row in rows:
        assert row["compilations_during_run"] == 0  # warm-up compiled every shape the workload used
        assert row["compile_s"] >= 0 and row["warmup_s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["num_requests"] == 8 and row["output_tokens"] == 32 and row["errors"] == 0
        assert row["ttft_s"] > 0 and row["tpot_s"] > 0 and row["tokens_per_s_per_user"] == pytest.approx(
            1 / row["tpot_s"])
        assert row["ttft_s_p50"] <= row["ttft_s_p90"] <= row["ttft_s_p99"]
        assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / row["devices"])
        assert row["predicted"] is not None and row["predicted"]["tpot_s"] > 0
        _check_comm(row)
    # a configuration whose shapes an earlier one compiled (this session's CLI test) reports no compilation
    assert any(r["compilations"] > 0 and r["compile_s"] > 0 for r in rows)
    measured = read_measurements(out / "results.jsonl")  # the planner's calibration loader
    assert [m["layout"] for m in measured] == ["DP1", *SUBSET]
    hw = load_hardware("cpu-host")
    errors = prediction_errors(measured, hw)
    assert len(errors) == 4 and all(e["tpot_s"]["predicted"] > 0 for e in errors)
    assert predict_measurement(measured[1], hw).tpot_s == pytest.approx(rows[1]["predicted"]["tpot_s"])
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok"] * 4 and table[1]["layout"] == SUBSET[0]
    with (out / "comm.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 8  # decode and prefill per configuration
    assert "| layout |" in (out / "comm.md").read_text()


def test_rerun_skips_what_is_in_the_file(subset_sweep, monkeypatch):
    spec, out, first = subset_sweep
    lines = (out / "results.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for a configuration already measured")

    monkeypatch.setattr(sweep, "_build_model", refuse)
    again = sweep.run_sweep(spec, out, progress=False, models={}, plots=False, log=lambda line: None)
    assert again.measured == 0 and len(again.skipped) == 4 and not again.failures
    assert [r["output_digest"] for r in again.rows] == [r["output_digest"] for r in first.rows]
    assert (out / "results.jsonl").read_text() == lines
    assert "measured now: 0, skipped: 4, failed now: 0" in sweep.format_summary(again)


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(sweep_models, tmp_path, monkeypatch):
    spec = spec_for(["DP2TP2EP2", "EP8"], reference_layout=None)
    warmup = moejax.Engine.warmup

    def fail_on_ep8(engine):
        if str(engine.model.layout) == "EP8":
            raise RuntimeError("injected failure on EP8")
        return warmup(engine)

    monkeypatch.setattr(moejax.Engine, "warmup", fail_on_ep8)
    res = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert [r["layout"] for r in res.rows] == ["DP2TP2EP2"] and res.measured == 1
    (failure,) = sweep.read_rows(tmp_path / "failures.jsonl")
    assert failure["layout"] == "EP8" and failure["error"] == "RuntimeError: injected failure on EP8"
    assert failure["stage"] == "run" and "fail_on_ep8" in failure["traceback"]
    assert "FAILED EP8 chunk 16 max_running 8: RuntimeError: injected" in sweep.format_summary(res)
    with (tmp_path / "results.csv").open() as f:
        assert [(r["layout"], r["status"]) for r in csv.DictReader(f)] == [("DP2TP2EP2", "ok"), ("EP8", "error")]
    read_measurements(tmp_path / "results.jsonl")  # failures stay out of the calibration file

    monkeypatch.setattr(moejax.Engine, "warmup", warmup)
    again = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert again.measured == 0 and {why for _, why in again.skipped} >= {"already in results.jsonl"}
    assert any("failed before" in why for _, why in again.skipped)
    retried = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False,
                              retry_failed=True, log=lambda line: None)
    assert retried.measured == 1 and [r["layout"] for r in retried.rows] == ["DP2TP2EP2", "EP8"]


def test_incompatible_max_running_is_skipped_and_named(sweep_models, tmp_path):
    res = sweep.run_sweep(spec_for(["DP8"], max_running=(4,), reference_layout=None), tmp_path, progress=False,
                          models=sweep_models, plots=False, log=lambda line: None)
    assert res.rows == [] and res.failures == []
    ((config, why),) = res.skipped
    assert config["layout"] == "DP8" and why == "max_running 4 is not a multiple of the 8 batch shards of DP8"


def test_warmup_is_excluded_and_arrivals_are_timed(subset_sweep, sweep_models):
    spec, _, res = subset_sweep
    model, _ = sweep_models[(MODEL, "DP1", sweep.DEFAULT, "float32", 0)]
    collector = Collector()
    engine = moejax.Engine(model, sweep._serve_config(spec, model, 16, 8), on_finish=collector)
    ref = res.outputs[sweep.key_of(res.rows[0])]
    closed = Workload(input_len=WORKLOAD.input_len, output_len=WORKLOAD.output_len, num_requests=5,
                      warmup_requests=3, seed=WORKLOAD.seed)
    result, warmup_s = serve(engine, collector, closed)
    assert len(result.records) == 5 and result.outputs == ref[:5] and warmup_s > 0
    assert engine.stats.steps > result.steps  # the warm-up's steps are not the run's
    poisson = Workload(input_len=WORKLOAD.input_len, output_len=WORKLOAD.output_len, num_requests=6,
                       warmup_requests=0, request_rate=400.0, seed=WORKLOAD.seed)
    result, _ = serve(engine, collector, poisson)
    start = result.records[0].arrival_s
    offsets = [r.arrival_s - start for r in result.records]
    assert offsets == pytest.approx([s.arrival_s for s in poisson.requests(512)])  # scheduled arrivals
    assert result.outputs == ref[:6] and all(r.ttft_s > 0 for r in result.records)


def test_plots_have_a_legend_entry_and_a_style_per_layout(subset_sweep, tmp_path):
    _, _, res = subset_sweep
    hw = load_hardware("cpu-host")
    path, legend = plots.plot_tradeoff(res.rows, tmp_path / "t.png", hw)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [label for label, _, _ in legend]
    assert labels == ["DP1", *SUBSET, "measured frontier", "planner frontier (cpu-host)"]
    layout_styles = [(colour, marker) for label, colour, marker in legend if label in ("DP1", *SUBSET)]
    assert len(set(layout_styles)) == 4 and len({c for c, _ in layout_styles}) == 4
    path, legend = plots.plot_latency_vs_chunk(res.rows, tmp_path / "l.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and [label for label, _, _ in legend] == ["DP1", *SUBSET]
    for n in (19, 40):  # more layouts than tab10 / tab20 colours
        styles = plots.styles([f"L{i}" for i in range(n)])
        assert len(set(styles.values())) == n and len({c for c, _ in styles.values()}) == n
    assert {"tradeoff_png", "latency_png"} <= set(res.paths)


@pytest.mark.skipif(MODES == (None,), reason="this runtime has one expert mode, covered by the subset sweep")
def test_replicated_expert_mode(sweep_models, tmp_path):
    """TP2EP4 with tokens replicated over the expert axis: one fused all-reduce over tensor x expert per layer."""
    res = sweep.run_sweep(spec_for(["TP2EP4"], expert_mode=("replicated_attention",)), tmp_path, progress=False,
                          models=sweep_models, plots=False, log=lambda line: None)
    assert [(r["layout"], r["expert_mode"]) for r in res.rows][1:] == [("TP2EP4", "replicated_attention")]
    _check_tokens(res, res.rows)
    _check_comm(res.rows[1])


def test_quantization_axis(sweep_models, tmp_path):
    """Each quantization is its own rows (float first), labelled, keyed apart (a rerun skips both), with the
    planner's weight precision; the float rows keep the reference's tokens."""
    spec = spec_for(["TP2"], quantization=(None, "int8"))
    res = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert not res.failures
    assert [(r["layout"], r["quantization"], r["precision"]) for r in res.rows] == [
        ("DP1", None, "fp32"), ("TP2", None, "fp32"), ("TP2", "int8", "int8")]
    assert res.rows[1]["tokens_match_reference"] is True
    assert len(res.outputs[sweep.key_of(res.rows[2])]) == WORKLOAD.num_requests
    summary = sweep.format_summary(res)
    assert "weights" in summary.splitlines()[0] and any(" int8 " in line for line in summary.splitlines())
    again = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert again.measured == 0 and len(again.skipped) == 3
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        spec_for(["TP2"], quantization=("int3",))


def test_prefix_caching_axis(sweep_models, tmp_path):
    """Caching off and on as rows of their own (reference off), keyed apart, on a shared-prefix workload: the
    reference's tokens, a hit rate only with caching, less prefill, the counts in the JSON lines and the CSV."""
    workload = Workload(input_len=WORKLOAD.input_len, output_len=WORKLOAD.output_len, num_requests=8,
                        warmup_requests=0, seed=3, shared_prefix_len=32, num_prefixes=2)
    spec = spec_for(["DP2"], prefix_caching=(False, True), workload=workload)
    assert [c["enable_prefix_caching"] for c in spec.configs()] == [False, False, True]
    res = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert not res.failures
    ref, off, on = res.rows
    assert [r["enable_prefix_caching"] for r in res.rows] == [False, False, True]
    assert all(r["tokens_match_reference"] for r in res.rows)
    assert off["prefix_hit_rate"] == 0 and on["prefix_hit_rate"] == on["cached_prompt_tokens"] / on["prompt_tokens"]
    assert on["prefix_hit_rate"] > 0 and on["prefill_tokens"] < off["prefill_tokens"]
    assert [r["prefix_hit_rate"] for r in read_measurements(tmp_path / "results.jsonl")] == [
        0.0, 0.0, on["prefix_hit_rate"]]
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(t["enable_prefix_caching"], t["cached_prompt_tokens"]) for t in table] == [
        ("False", "0"), ("False", "0"), ("True", str(on["cached_prompt_tokens"]))]
    summary = sweep.format_summary(res)
    assert "hit %" in summary.splitlines()[0] and f"{100 * on['prefix_hit_rate']:.1f}" in summary.splitlines()[4]
    again = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert again.measured == 0 and len(again.skipped) == 3
    old = {k: v for k, v in spec.configs()[1].items() if k != "enable_prefix_caching"}  # written before the field
    assert sweep.key_of(old) == sweep.key_of(spec.configs()[1]) != sweep.key_of(spec.configs()[2])


def test_split_layouts_pair_with_dp_attention_only():
    spec = spec_for(["TP2EP4", "TP4MTP1EP8"], expert_mode=(*MODES, None))
    assert [(c["layout"], c["expert_mode_requested"]) for c in spec.configs()][1:] == [
        ("TP2EP4", "dp_attention"), ("TP2EP4", "replicated_attention"), ("TP2EP4", sweep.DEFAULT),
        ("TP4MTP1EP8", "dp_attention"), ("TP4MTP1EP8", sweep.DEFAULT)]
    with pytest.raises(ValueError, match=r"layouts TP4MTP1EP8 split the MoE apart from attention and run only in "
                                         r"expert mode 'dp_attention', which the sweep's modes"):
        spec_for(["TP2EP4", "TP4MTP1EP8"], expert_mode=("replicated_attention",))


def test_split_layouts_beside_a_runtime_layout(sweep_models, tmp_path):
    """Split layouts and a runtime one over both expert modes: each split layout runs once, in dp_attention (not
    failed in the other mode), every row with the reference's greedy tokens; the collectives each implies read from
    the compiled steps, the planner's volume and prediction beside them."""
    spec = spec_for([*SPLIT, "TP2EP4"], expert_mode=MODES)
    res = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, plots=False, log=lambda line: None)
    assert not res.failures and not res.skipped
    assert [(r["layout"], r["expert_mode"]) for r in res.rows][1:] == [
        *((x, "dp_attention") for x in SPLIT), *(("TP2EP4", m) for m in MODES)]
    _check_tokens(res, res.rows)
    kinds = {}
    for row in res.rows[1:]:
        assert row["predicted"] is not None and row["compilations_during_run"] == 0
        for phase in ("decode", "prefill"):
            hlo, plan = row["comm"][phase], row["planner_comm"][phase]
            assert hlo["weight_moves"] == [] and hlo["unknown_trip_counts"] == 0
            assert hlo["wire_bytes"] > 0 and plan["layers"] > 0
        kinds[row["layout"]] = {k for k, v in row["comm"]["decode"]["by_kind"].items() if v["count"]}
        if not Layout.parse(row["layout"]).split:
            _check_comm(row)
    assert {"all-to-all", "all-reduce"} <= kinds["TP4MTP1EP8"]  # experts over attention's TP: tokens exchanged
    assert {"all-gather", "reduce-scatter", "all-to-all"} <= kinds["TP2MTP4EP2"]  # gathered over the MoE's TP
    assert "collective-permute" in kinds["TP2MTP1EP2PP2"] and "all-to-all" not in kinds["TP2MTP1EP2PP2"]
    summary = sweep.format_summary(res)
    assert "TP2MTP1EP2PP2    dp_attention" in summary
    assert "greedy tokens: 6 of 6 configurations equal the reference run's" in summary


@pytest.mark.slow
def test_every_layout_of_8_devices_with_split_moe(tmp_path, capsys):
    """`moejax sweep --layouts all --split-moe` on tiny-moe: every 8-device layout the planner plans with split
    layouts (`enumerate_layouts(8, cfg, Rules(split_moe=True))`, runtime and split) is measured, once each in the
    model's default mode (dp_attention), and gives the reference's greedy tokens."""
    from moejax import cli
    from moejax.planner.rules import Rules, enumerate_layouts

    planned, _ = enumerate_layouts(8, moejax.load_model_config(MODEL), Rules(split_moe=True))
    argv = ["sweep", "--model", MODEL, "--layouts", "all", "--split-moe", "--devices", "8", "--reference-layout", "DP1",
            "--input-len", "4:12", "--output-len", "4", "--num-requests", "8", "--warmup-requests", "0", "--seed",
            "3", "--decode-buckets", "max", "--chunk-sizes", "16", "--max-running", "8", "--out", str(tmp_path),
            "--no-progress", "--no-plot"]
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out
    rows = sweep.read_rows(tmp_path / "results.jsonl")
    assert not (tmp_path / "failures.jsonl").exists()
    assert rows[0]["layout"] == "DP1" and len({r["output_digest"] for r in rows}) == 1
    assert all(r["tokens_match_reference"] is True and r["expert_mode"] == "dp_attention" for r in rows)
    measured = [r["layout"] for r in rows[1:]]
    assert len(measured) == len(set(measured)) == len(planned) == 49  # 19 runtime layouts, 30 split
    assert set(measured) == {str(x) for x in planned}
    assert sum(Layout.parse(x).split for x in measured) == 30
    assert f"greedy tokens: {len(rows)} of {len(rows)} configurations equal the reference run's" in summary
    seconds = float(summary.strip().splitlines()[-1].split()[-2])
    print(json.dumps({"seconds": seconds, "layouts_measured": len(measured), "layouts_planned": len(planned)}))


@pytest.mark.slow
def test_every_layout_of_8_devices(tmp_path, sweep_models):
    """Every valid 8-device layout of tiny-moe, in every expert mode: tokens, calibration schema, collectives.

    `pytest -m slow -s tests/bench` prints the comm table (docs/benchmarks.md)."""
    layouts = Layout.enumerate(8, moejax.load_model_config(MODEL))
    assert len(layouts) == 19
    spec = spec_for([str(x) for x in layouts], expert_mode=MODES)
    res = sweep.run_sweep(spec, tmp_path, progress=False, models=sweep_models, log=lambda line: None)
    assert not res.failures and len(res.rows) == 1 + len(layouts) * len(MODES)
    _check_tokens(res, res.rows)
    dp1 = sweep_models[(MODEL, "DP1", sweep.DEFAULT, "float32", 0)][0]
    prompts = [list(r.prompt) for r in WORKLOAD.requests(512)]
    assert dp1.generate(prompts, max_new_tokens=4) == res.outputs[sweep.key_of(res.rows[0])]  # Model.generate too
    for row in res.rows:
        _check_comm(row)
    assert len(read_measurements(tmp_path / "results.jsonl")) == len(res.rows)
    print(json.dumps({"seconds": res.seconds, "configurations": len(res.rows)}))
    print((tmp_path / "comm.md").read_text())
