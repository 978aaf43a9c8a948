"""The first GPU's figures in one command: decode bandwidth, prefill MFU, a one-device sweep and a calibration.

    moejax bench gpu --out out/gpu                  # on a GPU host: qwen3-30b-a3b in bfloat16 (layers that fit)
    moejax bench gpu --model tiny-moe --dtype float32 --batch-sizes 1,4 --out /tmp/g   # CPU smoke (tests)

On the first local device (the hardware file from its kind, e.g. H100 -> h100-sxm, or `--hardware`), with
random weights drawn on the device (`moejax.weights.DeviceRandomSource`: a real-size model places in seconds):

Phases 1 and 2 run per MoE dispatch strategy (`--moe-strategies`, default auto then loop: on GPU "auto" is the
Pallas grouped GEMM, so a fallback is measured too).

1. **decode**: per batch size B, the compiled step on B rows of one token each at `--context` cached positions,
   timed alone (`--steps` calls back to back, the cache donated from call to call). Bytes a step must read: the
   weights every step reads, the experts B tokens route to (expected distinct experts under uniform routing,
   E (1 - (1 - X/E)^B) per layer) and the KV of every row; achieved bandwidth = bytes / step time, beside the
   hardware file's `memory_bandwidth`.
2. **prefill**: per batch size B, one step over B prompts of `--prefill-len` tokens; FLOPs from the planner's own
   count (`moejax.planner.cost.layer_flops_per_token`, causal: a token attends to its position + 1 keys) plus the
   unembedding of one row each; MFU = FLOPs / time / the hardware file's peak for the dtype.
3. **sweep**: the serving engine on DP1 over `--chunk-sizes` x `--max-running` (`moejax.bench.sweep`), rows in
   the planner's calibration schema (`OUT/sweep/results.jsonl`).
4. **calibration**: the planner's efficiency curves with `memory` and `compute` set from 1 and 2 (the best
   bandwidth fraction and MFU measured) and the others but the network's (`FITTED`) fitted to 3
   (`moejax.planner.calibrate.fit_efficiency`), written to `OUT/calibration.yaml`, which `moejax plan --hardware
   NAME --calibration OUT/calibration.yaml` reads; the planner's error on the sweep rows before and after.

A real-size model that does not fit one device runs with fewer layers (`--layers`; by default as many as fit in
`--memory-fraction` of the device's free memory): bandwidth and MFU are per-layer properties, and the rows name
the reduced config (written to `OUT/model.yaml`). Each phase stops starting new work when `--budget-s` is spent
(what was skipped is recorded), and a phase that fails is recorded and the next one runs. Writes `OUT/gpu.jsonl`
(one row per phase and batch size) and `OUT/summary.json`, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from moejax.args import Parser, int_in, int_list, read_model_config, real_in, run_main

DEFAULT_BATCHES = (1, 4, 16, 64, 256)
# Efficiency curves fitted to the one-device sweep: all but the network's (one device sends nothing) and the two
# fractions measured directly (decode bandwidth, prefill MFU).
FITTED = ("compute_rows", "grouped", "grouped_rows", "grouped_width", "narrow", "narrow_grouped", "memory_bytes",
          "routing_skew", "attention", "attention_context", "attention_memory", "attention_bytes", "kernel_s",
          "step_overhead_s")
_KINDS = (("gb200", "gb200-nvl72"), ("b200", "b200"), ("h200", "h200"), ("h100", "h100-sxm"))


def hardware_for(device) -> str:
    """The hardware file (`configs/hardware/`) for a JAX device, from its platform and kind."""
    if device.platform == "cpu":
        return "cpu-host"
    kind = device.device_kind.lower()
    for key, name in _KINDS:
        if key in kind:
            return name
    raise ValueError(f"no hardware file matches device kind {device.device_kind!r}; pass --hardware NAME (built-in: "
                     f"h100-sxm, h200, b200, gb200-nvl72) or a YAML path")


def layers_that_fit(cfg, dtype, free_bytes: float | None, fraction: float) -> int:
    """Most layers (<= cfg.num_layers) whose weights fit in `fraction` of `free_bytes` (all when unknown)."""
    from moejax.weights import canonical_shapes

    if free_bytes is None:
        return cfg.num_layers
    size = np.dtype(dtype).itemsize
    shapes = canonical_shapes(cfg)
    # The heaviest layer kind (an MoE layer) bounds every layer: bytes per layer from the tensors a MoE layer carries.
    last = cfg.num_layers - 1
    per_layer = sum(math.prod(s) for s, layers in shapes.values() if layers and last in layers) * size
    rest = sum(math.prod(s) for s, layers in shapes.values() if layers is None) * size
    n = int((fraction * free_bytes - rest) // per_layer)
    if n < 1:
        raise ValueError(f"not even one layer of {cfg.name or cfg.family} fits: {rest / 2**30:.2f} GiB outside the "
                         f"layers + {per_layer / 2**30:.2f} GiB per layer, {fraction:.0%} of "
                         f"{free_bytes / 2**30:.2f} GiB free; pass a smaller --model")
    return min(n, cfg.num_layers)


def decode_bytes(cfg, batch: int, context: int, weight_bytes: int, kv_bytes: int) -> dict[str, float]:
    """Bytes one decode step over `batch` rows at `context` cached positions must read, by part."""
    from moejax.planner.cost import expert_hit_fraction
    from moejax.planner.memory import cached_positions
    from moejax.weights import canonical_shapes

    shapes = canonical_shapes(cfg)
    experts = {n for n in shapes if n in ("moe.wg", "moe.wu", "moe.wd", "moe.bg", "moe.bu", "moe.bd")}
    per_expert = sum(math.prod(shapes[n][0][1:]) for n in experts) * weight_bytes
    dense = sum(math.prod(s) * (len(layers) if layers else 1) for n, (s, layers) in shapes.items()
                if n not in experts and n != "embed") * weight_bytes
    touched = cfg.num_experts * expert_hit_fraction(cfg.num_experts, cfg.num_experts_per_tok, batch)
    kv_per_token = cfg.kv_bytes_per_token(kv_bytes)
    return {"weights": float(dense), "experts": cfg.num_moe_layers * touched * per_expert,
            "embed": batch * cfg.hidden_size * weight_bytes,
            "kv": batch * cached_positions(cfg, context + 1) * kv_per_token}


def prefill_flops(cfg, batch: int, length: int) -> float:
    """FLOPs of one prefill of `batch` prompts of `length` tokens (the planner's count), logits of one row each."""
    from moejax.planner.cost import layer_flops_per_token

    per = layer_flops_per_token(cfg, (length + 1) / 2, "prefill")  # causal: on average (T + 1) / 2 keys
    per_layer = per["attention"] + per["shared"] + per["router"] + per["experts"]
    return batch * length * per_layer * cfg.num_layers + batch * 2.0 * cfg.vocab_size * cfg.hidden_size


def time_step(model, rows: int, length: int, context: int, calls: int, page_size: int = 16,
              seed: int = 0, steps=None) -> float:
    """Seconds per call of the model's compiled step on `rows` x `length` new tokens after `context` cached
    positions (compiled and run twice first; then `calls` calls back to back, the cache donated along).
    `steps`: the compiled steps to time (default the model's own; e.g. another MoE strategy's)."""
    import jax

    from moejax import steps as steps_lib
    from moejax.config import ceil_div

    steps = steps or model.steps
    pages = ceil_div(context + length, page_size)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.cfg.vocab_size, (rows, length), dtype=np.int32)
    pos = np.broadcast_to(context + np.arange(length, dtype=np.int32), (rows, length)).copy()
    table = np.arange(rows * pages, dtype=np.int32).reshape(rows, pages)
    index = np.full(rows, length - 1, np.int32)
    with jax.set_mesh(model.mesh):
        cache = steps.new_cache(rows * pages, page_size, model.dtype)
        args = (steps.put(tokens), steps.put(pos), steps.put(table), steps.put(index, steps_lib.TOKENS))
        for _ in range(2):
            _, out, cache = steps.step(model.params, cache, *args)
        jax.block_until_ready((out, cache))
        start = time.perf_counter()
        for _ in range(calls):
            _, out, cache = steps.step(model.params, cache, *args)
        jax.block_until_ready((out, cache))
        seconds = (time.perf_counter() - start) / calls
    del cache
    return seconds


def run(args: argparse.Namespace) -> dict:
    """Every phase (module docstring); returns the summary written to OUT/summary.json."""
    import jax
    import yaml

    import moejax
    from moejax.bench.sweep import PRECISION
    from moejax.fit import available_bytes
    from moejax.planner.hardware import load_hardware
    from moejax.weights import DeviceRandomSource

    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    hw_name = args.hardware or hardware_for(device)
    hw = load_hardware(hw_name)
    cfg = moejax.load_model_config(args.model)
    dtype = np.dtype(moejax.inference.DTYPES[args.dtype])
    layers = args.layers or layers_that_fit(cfg, dtype, available_bytes([device]), args.memory_fraction)
    if layers < cfg.num_layers:
        cfg = cfg.replace(num_layers=layers, name=f"{cfg.name or cfg.family}-{layers}-layers")
    model_path = out / "model.yaml"
    model_path.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items()}, sort_keys=False))
    precision = PRECISION[args.dtype]
    summary = {"device_kind": device.device_kind, "platform": device.platform, "hardware": hw_name,
               "model": args.model, "layers": layers, "model_layers": moejax.load_model_config(args.model).num_layers,
               "dtype": args.dtype, "peak_flops": hw.peak(precision), "peak_bandwidth": hw.memory_bandwidth}
    rows_path = out / "gpu.jsonl"
    rows_path.write_text("")
    say = args.log

    def record(row: dict) -> None:
        row = {"hardware": hw_name, "device_kind": device.device_kind, "model": str(model_path), **row}
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        summary.setdefault(row["phase"], []).append(row)

    t = time.perf_counter()
    model = moejax.Model(cfg, DeviceRandomSource(cfg, seed=0), layout="DP1", dtype=args.dtype, devices=[device])
    jax.block_until_ready(model.params)
    summary["place_s"] = time.perf_counter() - t
    say(f"placed {cfg.name or cfg.family} ({layers} of {summary['model_layers']} layers, {args.dtype}) on "
        f"{device.device_kind} in {summary['place_s']:.1f} s; hardware file {hw_name}")
    size = dtype.itemsize
    for strategy, phase, batch in ((s, p, b) for s in args.moe_strategies for p in ("decode", "prefill")
                                   for b in args.batch_sizes):
        tag = {"phase": phase, "batch_size": batch, "moe_strategy": strategy}
        if time.perf_counter() > deadline:
            record({**tag, "ok": False, "error": "skipped: --budget-s spent"})
            continue
        try:
            steps = model.steps if strategy == "auto" else model.steps.with_moe(moe_strategy=strategy)  # same weights
            if phase == "decode":
                step_s = time_step(model, batch, 1, args.context, args.steps, steps=steps)
                parts = decode_bytes(cfg, batch, args.context, size, size)
                moved = sum(parts.values())
                row = {**tag, "ok": True, "context": args.context,
                       "step_s": step_s, "bytes": moved, "bytes_by_part": parts,
                       "bandwidth": moved / step_s, "bandwidth_fraction": moved / step_s / hw.memory_bandwidth,
                       "tokens_per_s": batch / step_s}
                say(f"{strategy:<7} decode  B={batch:<4} {step_s * 1e3:9.3f} ms  {_si(row['bandwidth'])}B/s  "
                    f"{row['bandwidth_fraction']:6.1%} of {_si(hw.memory_bandwidth)}B/s")
            else:
                step_s = time_step(model, batch, args.prefill_len, 0, max(1, args.steps // 4), steps=steps)
                flops = prefill_flops(cfg, batch, args.prefill_len)
                row = {**tag, "ok": True, "prefill_len": args.prefill_len,
                       "step_s": step_s, "flops": flops, "flops_per_s": flops / step_s,
                       "mfu": flops / step_s / hw.peak(precision),
                       "tokens_per_s": batch * args.prefill_len / step_s}
                say(f"{strategy:<7} prefill B={batch:<4} {step_s * 1e3:9.3f} ms  {_si(row['flops_per_s'])}FLOP/s  "
                    f"MFU {row['mfu']:6.1%} of {_si(hw.peak(precision))}FLOP/s")
        except Exception as err:  # noqa: BLE001 - a failed measurement is recorded; the next one runs
            row = {**tag, "ok": False, "error": _error(err)}
            say(f"{strategy} {phase} B={batch}: FAILED {row['error'][:200]}")
        record(row)
    _sweep_and_calibrate(args, model, cfg, model_path, hw, hw_name, summary, deadline, out, say)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _sweep_and_calibrate(args, model, cfg, model_path, hw, hw_name, summary, deadline, out, say) -> None:
    from moejax.bench.sweep import DEFAULT, SweepSpec, run_sweep
    from moejax.bench.workload import Lengths, Workload
    from moejax.mesh import Layout
    from moejax.planner.calibrate import fit_efficiency, prediction_errors, save_efficiency

    if time.perf_counter() > deadline:
        summary["sweep"] = {"ok": False, "error": "skipped: --budget-s spent"}
        return
    spec = SweepSpec(model=str(model_path), layouts=(Layout(),), chunk_sizes=tuple(args.chunk_sizes),
                     max_running=tuple(args.max_running), hardware=hw_name, dtype=args.dtype,
                     workload=Workload(input_len=Lengths(args.sweep_input_len),
                                       output_len=Lengths(args.sweep_output_len), num_requests=args.sweep_requests))
    key = (spec.model, "DP1", DEFAULT, spec.dtype, spec.seed)
    try:
        res = run_sweep(spec, out / "sweep", progress=False, models={key: (model, summary["place_s"])}, plots=False,
                        log=say)
        rows = res.rows
        summary["sweep"] = {"ok": True, "rows": len(rows), "failures": len(res.failures),
                            "results": str(out / "sweep" / "results.jsonl")}
    except Exception as err:  # noqa: BLE001 - recorded; the calibration then uses the microbenchmarks alone
        rows = []
        summary["sweep"] = {"ok": False, "error": _error(err)}
        say(f"sweep FAILED {summary['sweep']['error'][:200]}")
    cap = 1.5 if hw_name == "cpu-host" else 1.0  # the CPU host's peaks are rough (Efficiency's bound)
    measured = {}
    best_bw = max((r["bandwidth_fraction"] for r in summary.get("decode", []) if r["ok"]), default=None)
    best_mfu = max((r["mfu"] for r in summary.get("prefill", []) if r["ok"]), default=None)
    if best_bw:
        measured["memory"] = min(best_bw, cap)
    if best_mfu:
        measured["compute"] = min(best_mfu, cap)
    start = hw.with_efficiency({**hw.efficiency.as_dict(), **measured})
    calib = {"measured": measured}
    eff, loss = start.efficiency, None
    if rows:
        before = prediction_errors(rows, hw)
        eff, loss = fit_efficiency(rows, start, factors=FITTED, max_fraction=cap)
        after = prediction_errors(rows, hw.with_efficiency(eff))
        calib["mean_abs_rel_error_before"] = _mean_error(before)
        calib["mean_abs_rel_error_after"] = _mean_error(after)
    path = save_efficiency(eff, out / "calibration.yaml", hardware=hw_name, loss=loss, measurements=len(rows))
    calib["file"] = str(path)
    summary["calibration"] = calib
    errors = [calib.get(f"mean_abs_rel_error_{k}", float("nan")) for k in ("before", "after")]
    say(f"calibration: {path} (memory {eff.memory:.2f}, compute {eff.compute:.2f}, step overhead "
        f"{eff.step_overhead_s * 1e3:.2f} ms); planner error on the sweep rows {errors[0]:.0%} -> {errors[1]:.0%}")


def _si(value: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:7.2f} {prefix}"
    return f"{value:7.0f} "


def _mean_error(errors: list[dict]) -> float:
    values = [abs(e[m]["rel_error"]) for e in errors for m in ("ttft_s", "tpot_s", "tokens_per_s_per_device")]
    return float(np.mean(values)) if values else float("nan")


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000] + "\n" + traceback.format_exc(limit=4)[-1500:]


def _strategies(text: str) -> list[str]:
    from moejax.model.moe import STRATEGIES

    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in values if x not in STRATEGIES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated MoE strategies from {', '.join(STRATEGIES)}, "
                                         f"got {text!r}")
    return values


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog or "python -m moejax.bench.gpu", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", help="model config name or YAML path (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="weights and activations (default %(default)s)")
    p.add_argument("--hardware", default=None, help="hardware file name or path (default: from the device kind)")
    p.add_argument("--out", default="out/gpu", help="output folder (default %(default)s)")
    p.add_argument("--batch-sizes", type=int_list(1, 1 << 20), default=list(DEFAULT_BATCHES),
                   help="decode and prefill batch sizes (default 1,4,16,64,256)")
    p.add_argument("--context", type=int_in(1), default=512,
                   help="cached positions per row in the decode step (default %(default)s)")
    p.add_argument("--prefill-len", type=int_in(1), default=128, help="tokens per prompt (default %(default)s)")
    p.add_argument("--steps", type=int_in(1), default=20, help="timed decode calls (default %(default)s)")
    p.add_argument("--layers", type=int_in(1), default=None,
                   help="layers to keep (default: as many as fit in --memory-fraction of the device's free memory)")
    p.add_argument("--memory-fraction", type=real_in(0.01, 1.0), default=0.7,
                   help="of the device's free memory for weights (default %(default)s)")
    p.add_argument("--moe-strategies", type=_strategies, default=["auto", "loop"],
                   help="MoE dispatch strategies to time, in order (default auto,loop: on GPU 'auto' is the Pallas "
                        "grouped GEMM, 'loop' the per-expert loop)")
    p.add_argument("--chunk-sizes", type=int_list(1, 1 << 20), default=[256, 1024],
                   help="sweep: prefill chunk sizes (default 256,1024)")
    p.add_argument("--max-running", type=int_list(1, 1 << 20), default=[8, 64],
                   help="sweep: requests in flight (default 8,64)")
    p.add_argument("--sweep-input-len", type=int_in(1), default=256, help="sweep: prompt tokens (default 256)")
    p.add_argument("--sweep-output-len", type=int_in(2), default=64,
                   help="sweep: output tokens (>= 2: TPOT needs two; default 64)")
    p.add_argument("--sweep-requests", type=int_in(1), default=128, help="sweep: requests per configuration "
                   "(default 128)")
    p.add_argument("--budget-s", type=real_in(0.0), default=540.0,
                   help="stop starting new measurements after this many seconds (default %(default)s)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    cfg = read_model_config(args.model)  # mistakes are refused before JAX starts
    if args.layers and args.layers > cfg.num_layers:
        p.error(f"--layers {args.layers} exceeds the model's {cfg.num_layers} layers")
    args.log = lambda line: print(line, flush=True)
    summary = run(args)  # a ValueError (e.g. no hardware file for the device) is one line (moejax.args.run_main)
    failed = [r for phase in ("decode", "prefill") for r in summary.get(phase, []) if not r["ok"]]
    print(f"wrote {Path(args.out) / 'gpu.jsonl'}, {Path(args.out) / 'summary.json'}"
          + (f"; {len(failed)} measurements failed or skipped (see gpu.jsonl)" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
