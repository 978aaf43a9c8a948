"""`moejax generate --prefill-layout`, `bench serve --prefill-layout` and `sweep --prefill-layouts`: disaggregated
prefill / decode from the command line (tokens equal the aggregated run's; rows record the split and the KV bytes
moved beside the planner's; a split larger than the devices is one line)."""

import json

import pytest

from moejax import cli
from moejax.bench import sweep
from moejax.bench.results import key_of
from tests.bench.conftest import MODEL
from tests.test_cli import _run


def test_generate_prefill_layout_gives_the_aggregated_tokens():
    prompts = ["--prompt-ids", "1,5,9,13,17", "--prompt-ids", "3,4", "--prompt-ids", ",".join(["7"] * 20)]
    common = ["generate", "--max-new-tokens", "5", "--json", "-q", "--page-size", "8", *prompts]
    split = json.loads(_run(*common, "--prefill-layout", "TP2", "--layout", "DP2EP2", "--devices", "6")
                       .strip().splitlines()[-1])
    agg = json.loads(_run(*common, "--layout", "DP1", "--devices", "1").strip().splitlines()[-1])
    assert split["tokens"] == agg["tokens"]
    assert (split["prefill_layout"], split["layout"], split["devices"]) == ("TP2", "DP2EP2", 6)
    assert (split["prefill_devices"], split["decode_devices"]) == (2, 4)
    # every prompt's KV moved: whole pages of 8 tokens (1, 1, 3 pages)
    page = split["kv_bytes_moved"][0]
    assert split["kv_bytes_moved"] == [page, page, 3 * page] and split["kv_transfer_bytes"] == 5 * page
    assert "prefill_layout" not in agg


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prefill-layout", "TP4", "--layout", "DP2EP2", "--devices", "4"],
     "layout TP4 (prefill) + DP2EP2 (decode) needs 8 devices but only 4 cpu devices are available; pass --devices 8"),
    (["generate", "--prefill-layout", "TP3"], "--prefill-layout: layout TP3 cannot run model tiny-moe"),
    (["generate", "--prefill-layout", "TP2", "--async-scheduling"], "does not run with --async-scheduling"),
])
def test_generate_prefill_layout_mistakes_are_one_line(argv, message):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "moejax.cli", *argv, "-q"], capture_output=True, text=True, env=env,
                         timeout=300)
    err = out.stderr.strip()
    assert out.returncode == 2 and err.startswith("moejax: error: ") and "\n" not in err, err
    assert message in err


@pytest.mark.parametrize("argv, message", [
    (["bench", "serve", "--prefill-layout", "TP4", "--layout", "TP4EP2"],
     "layout TP4 (prefill) + TP4EP2 (decode) needs 12 devices but only 8 cpu devices are available"),
    (["bench", "serve", "--prefill-layout", "TP2", "--async-scheduling"], "--prefill-layout: disaggregated serving "
                                                                        "does not run with --async-scheduling"),
    (["sweep", "--prefill-layouts", "none,XX"], "--prefill-layouts: cannot parse layout 'XX'"),
])
def test_bench_prefill_layout_mistakes_are_one_line(argv, message, capsys, monkeypatch):
    import moejax

    def refuse(*args, **kwargs):
        raise AssertionError("model work reached")

    monkeypatch.setattr(moejax.Model, "__init__", refuse)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moejax: error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def sweep_models():
    return {}


@pytest.fixture
def split_models(monkeypatch, sweep_models):
    """This module's placed models, by placement (devices) as well as layout."""
    real = sweep._build_model

    def cached(spec, layout, mode, quantization=None, devices=None):
        key = (spec.model, layout, mode or sweep.DEFAULT, spec.dtype, spec.seed, quantization,
               None if devices is None else tuple(d.id for d in devices))
        if key not in sweep_models:
            sweep_models[key] = (real(spec, layout, mode, quantization, devices=devices), 0.0)
        return sweep_models[key][0]

    monkeypatch.setattr(sweep, "_build_model", cached)


SERVE = ["bench", "serve", "--model", MODEL, "--chunk-size", "16", "--max-running", "4", "--input-len", "4:40",
         "--output-len", "4", "--num-requests", "6", "--warmup-requests", "0", "--decode-buckets", "max", "--json"]


def test_bench_serve_prefill_layout_row(capsys, split_models):
    rows = []
    for flags in (["--layout", "DP2"], ["--layout", "DP2", "--prefill-layout", "TP2"]):
        assert cli.main(SERVE + flags) == 0
        rows.append(json.loads(capsys.readouterr().out))
    agg, split = rows
    assert agg["prefill_layout"] is None and agg["devices"] == 2 and agg["kv_transfer_bytes_per_request"] is None
    assert (split["prefill_layout"], split["prefill_devices"], split["decode_devices"], split["devices"]) == (
        "TP2", 2, 2, 4)
    assert split["output_digest"] == agg["output_digest"] and split["errors"] == 0
    assert split["kv_transfers"] == 6 and split["preemptions"] == 0
    assert split["kv_transfer_bytes_per_request"] == split["planner_kv_transfer_bytes_per_request"] > 0
    assert split["predicted"] is None and key_of(split) != key_of(agg)


@pytest.mark.slow  # 14 s: the suite's time (bench serve --prefill-layout runs by default)
def test_sweep_prefill_layouts(tmp_path, capsys, split_models):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", MODEL, "--layouts", "DP2,TP4EP2", "--prefill-layouts", "none,TP2",
            "--reference-layout", "DP1", "--out", str(out), "--no-progress", "--no-plot", "--input-len", "4:24",
            "--output-len", "3", "--num-requests", "4", "--warmup-requests", "0", "--decode-buckets", "max",
            "--chunk-sizes", "16", "--max-running", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "greedy tokens: 4 of 4 configurations equal the reference run's" in text
    assert "skipped prefill TP2 + TP4EP2 chunk 16 max_running 2: prefill layout TP2 + layout TP4EP2 need 10" in text
    rows = sweep.read_rows(out / "results.jsonl")
    assert [(r["prefill_layout"], r["layout"]) for r in rows] == [(None, "DP1"), (None, "DP2"), ("TP2", "DP2"),
                                                                   (None, "TP4EP2")]
    split = rows[2]
    assert split["devices"] == 4 and split["kv_transfer_bytes_per_request"] > 0
    assert split["kv_transfer_bytes_per_request"] == split["planner_kv_transfer_bytes_per_request"]
    assert "TP2+DP2 (2+2 devices)" in text


def test_sweep_spec_pairs_prefill_layouts():
    from moejax.mesh import Layout
    from tests.bench.conftest import spec_for

    spec = spec_for(["DP2"], prefill_layouts=(None, Layout.parse("TP2")))
    assert [(c["layout"], c["prefill_layout"]) for c in spec.configs()] == [("DP1", None), ("DP2", None),
                                                                          ("DP2", "TP2")]
    with pytest.raises(ValueError, match="async scheduling yet"):
        spec_for(["DP2"], prefill_layouts=(Layout.parse("TP2"),), async_scheduling=True)
