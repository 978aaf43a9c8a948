"""`moejax bench gpu` on CPU devices (figures relative to the cpu-host hardware file), its byte and FLOP counts
against independent counts, and the device-side random weights it places with."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest


def test_decode_bytes_count_every_weight_once_when_every_expert_is_touched():
    """At a batch that touches every expert, weights + experts + embed rows = the model's parameter bytes with the
    embedding table replaced by the rows read (independent count: the placed model's own arrays)."""
    import moejax
    from moejax.bench.gpu import decode_bytes

    cfg = moejax.load_model_config("tiny-moe")
    model = moejax.Model.random(cfg, layout="DP1")
    total = sum(int(np.prod(x.shape)) * 4 for x in __import__("jax").tree.leaves(model.params))
    parts = decode_bytes(cfg, batch=10_000, context=7, weight_bytes=4, kv_bytes=4)
    embed = cfg.vocab_size * cfg.hidden_size * 4
    assert parts["weights"] + parts["experts"] == pytest.approx(total - embed, rel=1e-9)
    assert parts["embed"] == 10_000 * cfg.hidden_size * 4
    # KV: every row reads its 8 positions' k and v in every layer
    assert parts["kv"] == 10_000 * 8 * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * cfg.num_layers
    # one token touches exactly X experts per layer
    one = decode_bytes(cfg, batch=1, context=7, weight_bytes=4, kv_bytes=4)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert one["experts"] == pytest.approx(cfg.num_layers * cfg.num_experts_per_tok * per_expert)


def test_prefill_flops_match_a_hand_count():
    import moejax
    from moejax.bench.gpu import prefill_flops

    cfg = moejax.load_model_config("tiny-moe")
    B, T = 3, 16
    D, N, K, H, F, X, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.moe_intermediate_size,
                           cfg.num_experts_per_tok, cfg.vocab_size)
    proj = 2 * D * (N * H + 2 * K * H + N * H)  # q, k, v, o
    keys = sum(t + 1 for t in range(T))  # causal: token t attends t + 1 keys
    scores = 2 * N * 2 * H * keys  # q.k and p.v
    experts = 2 * X * 3 * D * F
    router = 2 * D * cfg.num_experts
    want = cfg.num_layers * (B * T * (proj + experts + router) + B * scores) + B * 2 * V * D
    assert prefill_flops(cfg, B, T) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("kind", "name"), [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H200", "h200"),
                                            ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200-nvl72")])
def test_hardware_file_from_the_device_kind(kind, name):
    from moejax.bench.gpu import hardware_for

    assert hardware_for(SimpleNamespace(platform="gpu", device_kind=kind)) == name


def test_an_unknown_device_kind_names_the_flag():
    from moejax.bench.gpu import hardware_for

    with pytest.raises(ValueError, match=r"no hardware file matches device kind 'NVIDIA A10'.*--hardware"):
        hardware_for(SimpleNamespace(platform="gpu", device_kind="NVIDIA A10"))


def test_layers_that_fit():
    import jax.numpy as jnp

    import moejax
    from moejax.bench.gpu import layers_that_fit

    cfg = moejax.load_model_config("qwen3-30b-a3b")
    assert layers_that_fit(cfg, np.float32, None, 0.7) == 48
    # 80 GB at 0.7 in bf16: the 48 layers (~57 GiB) do not all fit, some do
    n = layers_that_fit(cfg, np.dtype(jnp.bfloat16), 80e9, 0.7)
    assert 20 < n < 48
    with pytest.raises(ValueError, match="not even one layer"):
        layers_that_fit(cfg, np.float32, 1e9, 0.7)


def test_device_random_weights_zero_the_padding_and_make_valid_tokens():
    """Padded vocabulary columns and FFN padding are zero (as `place` makes them), so no padded id is generated."""
    import jax

    import moejax
    from moejax.weights import DeviceRandomSource

    cfg = moejax.load_model_config("tiny-moe").replace(vocab_size=509, moe_intermediate_size=250, num_layers=3)
    model = moejax.Model(cfg, DeviceRandomSource(cfg, seed=1), layout="TP4PP2")
    unembed = np.asarray(jax.device_get(model.params["unembed"]))
    assert unembed.shape[1] > 509 and not unembed[:, 509:].any() and unembed[:, :509].all()
    wg = np.asarray(jax.device_get(model.params["layers"]["moe"]["wg"]))
    assert wg.shape[-1] > 250 and not wg[..., 250:].any()
    live = np.abs(wg).reshape(wg.shape[0], -1).sum(axis=1) > 0  # 3 layers over 2 stages: one padding slot
    assert live.sum() == 3 and len(live) == 4
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=6)
    assert all(0 <= t < 509 for row in out for t in row)


def test_bench_gpu_on_cpu_devices(tmp_path):
    """The whole command on one CPU device: every phase's rows, figures consistent with their parts, a
    calibration file the planner reads, and the planner's error on the sweep rows not worse after it."""
    from moejax.bench import gpu
    from moejax.planner.hardware import load_hardware

    out = tmp_path / "gpu"
    argv = ["--model", "tiny-moe", "--dtype", "float32", "--batch-sizes", "1,3", "--steps", "2", "--prefill-len", "8",
            "--chunk-sizes", "16", "--max-running", "2", "--sweep-input-len", "8", "--sweep-output-len", "3",
            "--sweep-requests", "4", "--moe-strategies", "auto,loop", "--out", str(out)]
    assert gpu.main(argv) == 0
    rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    assert [(r["moe_strategy"], r["phase"], r["batch_size"]) for r in rows] == [
        (s, p, b) for s in ("auto", "loop") for p in ("decode", "prefill") for b in (1, 3)]
    hw = load_hardware("cpu-host")
    assert all(r["ok"] and r["hardware"] == "cpu-host" for r in rows)
    for r in rows:
        if r["phase"] == "decode":
            assert r["bytes"] == pytest.approx(sum(r["bytes_by_part"].values()))
            assert r["bandwidth_fraction"] == pytest.approx(r["bytes"] / r["step_s"] / hw.memory_bandwidth)
        else:
            assert r["mfu"] == pytest.approx(r["flops"] / r["step_s"] / hw.peak("fp32"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"]["ok"] and summary["sweep"]["rows"] == 1
    calib = summary["calibration"]
    assert calib["mean_abs_rel_error_after"] <= calib["mean_abs_rel_error_before"]
    tuned = load_hardware("cpu-host", efficiency=calib["file"])
    best_bw = max(r["bandwidth_fraction"] for r in rows if r["phase"] == "decode")
    assert tuned.efficiency.memory == pytest.approx(min(best_bw, 1.5), rel=1e-6)
    assert math.isfinite(tuned.efficiency.step_overhead_s)


@pytest.mark.parametrize(("argv", "message"), [
    (["--moe-strategies", "auto,dense"], "expected comma-separated MoE strategies"),
    (["--batch-sizes", "0"], "--batch-sizes: each entry must be an integer in"),
    (["--memory-fraction", "1.5"], "--memory-fraction: must be a finite number in [0.01, 1]"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "tiny-moe", "--layers", "9"], "--layers 9 exceeds the model's 4 layers"),
    (["--sweep-output-len", "1"], "--sweep-output-len: must be an integer in [2,"),
])
def test_argument_mistakes_are_one_line(capsys, argv, message):
    from moejax.args import run_main
    from moejax.bench import gpu

    assert run_main(gpu.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: ") and message in err and err.count("\n") == 1


def test_a_spent_budget_records_what_was_skipped(tmp_path):
    from moejax.bench import gpu

    out = tmp_path / "gpu"
    assert gpu.main(["--model", "tiny-moe", "--dtype", "float32", "--batch-sizes", "1", "--budget-s", "1e-9",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    assert [r["error"] for r in rows] == ["skipped: --budget-s spent"] * 4  # auto and loop, decode and prefill
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"] == {"ok": False, "error": "skipped: --budget-s spent"}
