"""Compile benchmark: how long a model takes to place and to warm up on a layout, and how big its program is.

    python -m moejax.bench.compile --model qwen3-30b-a3b-tiny --layouts DP1,EP8,DP2TP2EP2
    python -m moejax.bench.compile --model deepseek-count-tiny --layouts DP1 --out compile.jsonl

For each layout, in a fresh engine (random weights, float32, CPU devices simulated as needed):
weight placement time, engine warm-up time (compiling every shape of the default `ServeConfig`:
the prefill chunk and each decode bucket), the compiled program size (HLO instructions of the
decode step, from `compiled.as_text()`) and the process's peak resident memory. A real model
needs all of these to be independent of its expert and layer counts; compare two configs that
differ only in those counts to see it. Prints a table and writes one JSON line per layout.

With `--target` (h100-sxm, h200, b200: `moejax.gpu_target.targets()`), the same model is compiled for that
GPU on this machine, which needs none (`pip install 'moejax[gpu-compile]'`): real sizes, abstract weights,
nothing placed. Per program (prefill, decode, the engine's step) it prints memory per device beside the
planner's, collective bytes beside the planner's, and the routed experts' FLOPs beside the ideal:

    moejax bench compile --target h100-sxm --model qwen3-30b-a3b --layouts DP1,EP8,TP4EP2,TP4MTP1EP8 --json

With `--quantization` (int8, fp8, int4: weights quantized at load, `moejax.quant`) the model's weights are
quantized; with a target it also prints the FP8 GEMMs the program holds (op name: count of instructions, as the
HLO names them) and their share of the matmul FLOPs (an fp8 model runs W8A8 on GPUs: `moejax.model.fp8_matmul`):

    moejax bench compile --target h100-sxm --model qwen3-30b-a3b-tiny --quantization fp8 --fp8-gemm --phases decode
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from moejax.args import Parser, expert_mode, int_in, read_model_config, run_main
from moejax.config import QUANTIZATIONS
from moejax.gpu_target import hlo_instructions


def measure(model_name: str, layout: str, serve_overrides: dict | None = None,
            expert_mode: str = "dp_attention", quantization: str | None = None) -> dict:
    """Place, warm up and size one (model, layout); returns the figures as a dict."""
    import jax

    import moejax

    cfg = moejax.load_model_config(model_name)
    t0 = time.perf_counter()
    model = moejax.Model.random(cfg, layout=layout, expert_mode=expert_mode, quantization=quantization)
    jax.block_until_ready(model.params)
    place_s = time.perf_counter() - t0
    engine = moejax.Engine(model, moejax.ServeConfig(**(serve_overrides or {})))
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    text = engine.compiled_step("decode", engine.decode_buckets[0]).as_text()
    return {"model": cfg.name, "layout": str(model.layout), "expert_mode": expert_mode, "quantization": quantization,
            "experts": cfg.num_experts, "layers": cfg.num_layers,
            "place_s": round(place_s, 2), "warmup_s": round(warmup_s, 2),
            "shapes": 1 + len(engine.decode_buckets), "decode_hlo_instructions": hlo_instructions(text),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "platform": jax.devices()[0].platform}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog or "python -m moejax.bench.compile", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b-tiny", help="model config name or path (random weights)")
    p.add_argument("--layouts", default="DP1", help="comma-separated layouts, e.g. DP1,EP8,DP2TP2EP2,TP4MTP1EP8")
    p.add_argument("--expert-mode", "--ep-attention", dest="expert_mode", default="dp_attention", type=expert_mode,
                   help="the expert axis's mode: dp_attention or replicated_attention")
    p.add_argument("--out", default=None, help="append one JSON line per layout (with --target: per program) here")
    p.add_argument("--target", default=None, help="compile for this GPU (h100-sxm, h200, b200) without one, instead")
    p.add_argument("--phases", default="prefill,decode,engine", help="with --target: programs to compile")
    p.add_argument("--moe-strategy", default="auto", help="with --target: MoE dispatch strategy (moejax.model.moe)")
    p.add_argument("--exchange", default="auto", help="with --target: the dp_attention mode's token exchange")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="with --target")
    p.add_argument("--batch", type=int_in(1), default=64, help="with --target: concurrent requests per replica")
    p.add_argument("--context", type=int_in(1), default=2048, help="with --target: longest sequence (KV pages)")
    p.add_argument("--chunk", type=int_in(1), default=512,
                   help="with --target: prefill tokens per step per batch shard")
    p.add_argument("--json", action="store_true", help="with --target: print one JSON object per program")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="quantize the weights at load (weight-only)")
    p.add_argument("--fp8-gemm", action="store_true",
                   help="with --target and --quantization fp8: run fp8 weights as W8A8 on FP8 GEMMs "
                        "(moejax.model.fp8_matmul; opt-in: it copies the weights, see its doc)")
    args = p.parse_args(argv)
    if args.fp8_gemm:
        from moejax.model import fp8_matmul

        fp8_matmul.PLATFORMS = ("gpu",)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts:
        p.error("--layouts is empty")
    if args.target is not None:
        return run_target(p, args, layouts)
    from moejax.mesh import Layout
    from moejax.sharding import Parallelism

    cfg = read_model_config(args.model)
    try:
        parsed = [Layout.parse(x).validate(cfg) for x in layouts]
        for layout in parsed:
            Parallelism(layout, args.expert_mode)  # a split layout in the replicated_attention mode is refused
    except ValueError as err:
        p.error(str(err))
    need = max(x.size for x in parsed)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()
    print(f"{'layout':<16} {'place s':>8} {'warm-up s':>10} {'HLO instr':>10} {'peak RSS GiB':>13}")
    for layout in layouts:
        row = measure(args.model, layout, expert_mode=args.expert_mode, quantization=args.quantization)
        print(f"{row['layout']:<16} {row['place_s']:>8.2f} {row['warmup_s']:>10.2f} "
              f"{row['decode_hlo_instructions']:>10} {row['peak_rss_gib']:>13.2f}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def run_target(p: argparse.ArgumentParser, args, layouts: list[str]) -> int:
    """`--target`: compile each layout's programs for the GPU target; bad input is one `p.error` line (exit 2)."""
    from moejax import gpu_target

    if args.target not in gpu_target.targets():
        p.error(f"--target: unknown GPU target {args.target!r}; known: {sorted(gpu_target.targets())}")
    phases = tuple(x for x in args.phases.split(",") if x)
    if not phases or any(x not in gpu_target.PHASES for x in phases):
        p.error(f"--phases: {args.phases!r}; choose from {','.join(gpu_target.PHASES)}")
    try:
        shapes = gpu_target.Shapes(batch=args.batch, context=args.context, chunk=args.chunk)
    except ValueError as err:
        p.error(str(err))
    import moejax
    from moejax.mesh import Layout
    from moejax.sharding import Parallelism

    try:  # no backend starts here: the layouts are checked whether or not this machine can compile for a GPU
        cfg = moejax.load_model_config(args.model)
        for layout in layouts:  # a split layout in the replicated_attention mode is refused here too
            Parallelism(Layout.parse(layout).validate(cfg), args.expert_mode, args.moe_strategy,
                        args.exchange).checked("gpu")
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    why = gpu_target.unavailable_reason()
    if why:
        p.error(f"--target needs the GPU compile packages: {why}")
    gpu_target.prepare()
    if not args.json:
        print(f"{'layout':<16} {'phase':<8} {'GiB/dev':>8} {'planner':>8} {'coll MB':>9} {'planner':>9} "
              f"{'expert GF':>10} {'ideal':>9}  collectives / error")
    failed = 0
    for layout in layouts:
        for res in gpu_target.compile_layout(cfg, layout, args.target, shapes, phases, args.dtype, args.moe_strategy,
                                             args.expert_mode, args.exchange, args.quantization):
            failed += not res.ok
            row = res.as_dict()
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(_target_line(res), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 1 if failed else 0


def _target_line(res) -> str:
    if not res.ok:
        return f"{res.layout:<16} {res.phase:<8} {'FAILED':>8}  {res.error}"
    pl = res.planner
    kinds = " ".join(f"{k}:{n}" for k, n in res.collectives.items()) or "none"
    return (f"{res.layout:<16} {res.phase:<8} {res.total_bytes / 2**30:>8.2f} {pl['memory_bytes'] / 2**30:>8.2f} "
            f"{res.collective_bytes / 1e6:>9.2f} {pl['collective_bytes'] / 1e6:>9.2f} "
            f"{res.expert_flops / 1e9:>10.1f} {pl['expert_flops'] / 1e9:>9.1f}  {kinds}"
            + (f" (loops of unknown trip count: {res.unknown_loops}, counted once)" if res.unknown_loops else "")
            + (_fp8_part(res) if res.quantization else ""))


def _fp8_part(res) -> str:
    gemms = ", ".join(f"{op}: {n}" for op, n in res.fp8_gemms.items()) or "none"
    share = res.fp8_flops / res.flops if res.flops else 0.0
    return f"; FP8 GEMMs {gemms} ({share:.0%} of matmul FLOPs)"


if __name__ == "__main__":
    sys.exit(run_main(main))
