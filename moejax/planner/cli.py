"""`moejax plan`: predict every layout of N devices for a model and hardware, rank them, draw the frontier.

    moejax plan --model gpt-moe-1800b --hardware gb200-nvl72 --devices 64 --precision fp4 \\
        --isl 1024 --osl 256 --target-tps-user 20 [--json | --json-full] [--out out/plan]
    moejax plan --model qwen3-30b-a3b --hardware h200 --devices 8 --isl 8192 --prefix-hit-rate 0.8
    moejax plan --model deepseek-v3 --hardware h200 --devices 8 --layouts EP8,TP8MTP1EP8,TP4MTP1EP8
    moejax plan --model mixtral-8x7b --hardware h100-sxm --devices 8 --disaggregated   # prefill / decode apart

Also `python -m moejax.planner.cli --model ...` (same flags). `--model` takes a built-in name, a YAML file, a
Hugging Face config.json or checkpoint folder (every family `moejax.config.ModelConfig.from_hf` reads), or a
moejax checkpoint. A mistake in a flag or a named file is one line, `moejax: error: ...`, and exit status 2; the
device count, the lists and the number of configurations are bounded, so a run never hangs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from moejax.args import (
    Parser,
    UsageError,
    add_debug,
    expert_mode,
    int_in,
    int_list,
    read_model_config,
    real_in,
    run_main,
)
from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.disagg import format_disagg_summary, plan_disaggregated, write_disagg_outputs
from moejax.planner.hardware import PRECISIONS, load_hardware
from moejax.planner.report import compact_json, format_summary, write_outputs
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.sweep import DEFAULT_BATCHES, DEFAULT_CHUNKS, plan
from moejax.planner.workload import KV_BYTES, Options, Workload

MAX_DEVICES = 1_000_000  # enumerating the layouts of N devices walks N's divisors
MAX_CONFIGS = 200_000  # layouts x batch sizes x chunk sizes in one run (~0.4 ms each: about a minute and a half)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model config: bare name in configs/models/ or a path")
    p.add_argument("--hardware", required=True, help="hardware config: bare name in configs/hardware/ or a path")
    p.add_argument("--devices", type=int_in(1, MAX_DEVICES), required=True,
                   help=f"number of devices N (1 to {MAX_DEVICES:_})")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS, help="weight format of linear layers")
    p.add_argument("--kv-precision", default="bf16", choices=sorted(KV_BYTES),
                   help="KV-cache format (fp8 / int8: the runtime's --kv-cache-dtype, scales counted)")
    p.add_argument("--isl", type=int_in(1), default=1024, help="prompt tokens per request")
    p.add_argument("--osl", type=int_in(1), default=256, help="output tokens per request")
    p.add_argument("--target-tps-user", type=real_in(0.0), default=20.0, help="rank at tokens/s/user >= this")
    p.add_argument("--batch-sizes", type=int_list(1), default=list(DEFAULT_BATCHES),
                   help="concurrent requests per data-parallel replica, comma-separated")
    p.add_argument("--chunk-sizes", type=int_list(1), default=list(DEFAULT_CHUNKS), help="prefill chunk sizes")
    p.add_argument("--expert-mode", "--ep-attention", dest="expert_mode", default="dp_attention", type=expert_mode,
                   help="expert axis outside MoE blocks: dp_attention (attention data-parallel over the expert group, "
                        "tokens exchanged all-to-all; the runtime's default) or replicated_attention (tokens "
                        "replicated over the expert group, one all-reduce; kept for comparison). --ep-attention and "
                        "the names data / replicated: deprecated, for one release")
    p.add_argument("--microbatches", type=int_in(1), default=None,
                   help="pipeline microbatch groups M, the runtime's ServeConfig.microbatches (default: PP)")
    p.add_argument("--prefix-hit-rate", type=_hit_rate, default=0.0, metavar="H",
                   help="fraction of prompt tokens served from the prefix cache, in [0, 1) (the runtime's "
                        "--enable-prefix-caching): prefill computes (1 - H) of each prompt; default 0")
    p.add_argument("--arrival-rate", type=real_in(0.0), default=None,
                   help="Poisson arrivals in requests/s over all replicas (TTFT queues, M/D/1); default: closed loop "
                        "at each batch size's concurrency")
    p.add_argument("--split-moe", action="store_true",
                   help="also plan layouts whose MoE splits the devices apart from attention, e.g. TP8MTP1EP8")
    p.add_argument("--layouts", "--layout", dest="layouts", default=None,
                   help="plan only these layouts, comma-separated, in the runtime's syntax (e.g. TP4MTP1EP8,TP8EP8: "
                        "an MTP factor needs no --split-moe); one the runtime refuses is an error with its reasons")
    p.add_argument("--comm-overlap", type=real_in(0.0, 1.0), default=0.0,
                   help="fraction of collective time hidden [0, 1]")
    p.add_argument("--calibration", "--efficiency", dest="efficiency", default=None,
                   help="efficiency curves file from calibration (YAML/JSON, moejax.planner.calibrate)")
    p.add_argument("--no-kv-replication", action="store_true", help="tighten: TP <= KV heads")
    p.add_argument("--tp-within-domain", action="store_true", help="tighten: TP inside one NVLink domain")
    p.add_argument("--ep-within-domain", action="store_true", help="tighten: TP x EP inside one NVLink domain")
    p.add_argument("--min-layers-per-stage", type=int_in(1), default=1, help="tighten: layers per pipeline stage")
    p.add_argument("--top", type=int_in(0), default=15, help="rows of the ranking to print")
    p.add_argument("--out", default="out/plan",
                   help="folder for configs.csv, pareto.csv, pareto.png (and plan.json with --json)")
    p.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    p.add_argument("--disaggregated", action="store_true",
                   help="plan prefill and decode on separate devices (x prefill instances of one layout, y decode "
                        "instances of another, KV moved between them) beside the aggregated plan: writes "
                        "disagg.csv, disagg_pareto.csv, disagg.png (and disagg.json with --json)")
    as_json = p.add_mutually_exclusive_group()
    as_json.add_argument("--json", action="store_true",
                         help="print a compact JSON object (summary, top of the ranking, frontier, file paths) "
                              "instead of the summary; every configuration goes to plan.json in --out")
    as_json.add_argument("--json-full", action="store_true",
                         help="print the whole plan as one JSON object (every configuration: megabytes for a large "
                              "sweep)")


def _hit_rate(text: str) -> float:
    """An argparse type for --prefix-hit-rate: a number in [0, 1) (at 1 prefill would compute nothing)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1) (the fraction of prompt tokens served from "
                                         f"the prefix cache), got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="predict and rank every parallel layout of N devices",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the planner for parsed `args`; print the summary (or JSON); return the exit code."""
    start = time.perf_counter()
    _check_disaggregated(args)
    cfg = read_planned_model(args.model)
    hw = load_hardware(args.hardware, efficiency=args.efficiency)
    workload = Workload(isl=args.isl, osl=args.osl, precision=args.precision, kv_precision=args.kv_precision,
                        arrival_rate=args.arrival_rate or None, prefix_hit_rate=args.prefix_hit_rate)
    options = Options(expert_mode=args.expert_mode, microbatches=args.microbatches, comm_overlap=args.comm_overlap)
    rules = Rules(allow_kv_replication=not args.no_kv_replication, tp_within_domain=args.tp_within_domain,
                  ep_within_domain=args.ep_within_domain, min_layers_per_stage=args.min_layers_per_stage,
                  split_moe=args.split_moe)
    only = _named_layouts(cfg, hw, rules, args)
    if only and any(lay.split for lay in only):
        rules = dataclasses.replace(rules, split_moe=True)  # described with the rules in force
    _check_size(cfg, hw, rules, args, only)
    if args.disaggregated:
        return _run_disaggregated(args, cfg, hw, workload, options, rules, start)
    result = plan(cfg, hw, args.devices, workload, options, rules, args.batch_sizes, args.chunk_sizes,
                  args.target_tps_user, layouts=only)
    return _report(args, result, start, write_outputs,
                   lambda paths: compact_json(result, paths, args.top) if args.json else result.to_json(),
                   format_summary)


def _report(args: argparse.Namespace, result, start: float, write, to_json, summary) -> int:
    """Write a plan's files under --out (`write`), then print its JSON (`to_json(paths)`, with the files) or its
    summary (`summary(result, top, paths)`); an --out that cannot be written is one line."""
    try:
        paths = write(result, args.out, plot=not args.no_plot, full_json=args.json)
    except OSError as err:
        raise UsageError(f"--out {args.out}: cannot write the results: {err}") from err
    result.seconds = time.perf_counter() - start
    if args.json or args.json_full:
        obj = to_json(paths)
        obj["files"] = {k: str(v) for k, v in paths.items()}
        json.dump(obj, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(summary(result, args.top, paths))
    return 0


def _check_disaggregated(args: argparse.Namespace) -> None:
    """Refuse what --disaggregated does not model, before reading the model (one line each)."""
    if not args.disaggregated:
        return
    if args.devices < 2:
        raise UsageError(f"--disaggregated needs --devices >= 2 (prefill and decode on separate devices), "
                         f"got {args.devices}")
    if args.osl < 2:
        raise UsageError(f"--disaggregated needs --osl >= 2 (the first token comes from prefill, the others from "
                         f"decode), got {args.osl}")
    for flag, value in (("--layouts", args.layouts), ("--arrival-rate", args.arrival_rate)):
        if value is not None:
            raise UsageError(f"{flag} is not supported with --disaggregated (instances are enumerated; the load "
                             f"is the closed loop)")


def _run_disaggregated(args: argparse.Namespace, cfg, hw, workload: Workload, options: Options, rules: Rules,
                       start: float) -> int:
    """`moejax plan --disaggregated`: plan, write the files, print the summary (or JSON)."""
    result = plan_disaggregated(cfg, hw, args.devices, workload, options, rules, args.batch_sizes,
                                args.chunk_sizes, args.target_tps_user)

    def to_json(paths):
        return {**result.to_json(top=args.top if args.json else None), "seconds": result.seconds}

    return _report(args, result, start, write_disagg_outputs, to_json, format_disagg_summary)


def read_planned_model(source: str) -> ModelConfig:
    """The model `--model` names (`moejax.args.read_model_config`), except that a Hugging Face config.json's
    `quantization_config` is set aside: it says how the published weights are stored (DeepSeek-V3's fp8,
    gpt-oss's mxfp4), which the runtime's loader refuses, while the planner's weight format is --precision."""
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    try:
        hf = json.loads(file.read_text()) if file.suffix == ".json" and file.is_file() else None
    except (ValueError, UnicodeDecodeError):
        hf = None  # read_model_config names the error
    if not isinstance(hf, dict) or not hf.get("quantization_config"):
        return read_model_config(source)
    try:
        return ModelConfig.from_hf({k: v for k, v in hf.items() if k != "quantization_config"}, name=file.parent.name)
    except KeyError as err:
        raise UsageError(f"model config {source!r}: missing key {err.args[0]!r}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"model config {source!r}: {err}") from err


def _named_layouts(cfg, hw, rules: Rules, args: argparse.Namespace) -> list[Layout] | None:
    """The layouts `--layouts` names (None: every layout of --devices), each one the rules accept: one the runtime
    refuses is an error in `Layout.validate`'s words."""
    if args.layouts is None:
        return None
    try:
        named = [Layout.parse(part) for part in args.layouts.split(",") if part.strip()]
        if not named:
            raise ValueError("no layout given")
        _, rejected = enumerate_layouts(args.devices, cfg, rules, hw.nvlink_domain, only=named)
    except ValueError as err:
        raise UsageError(f"--layouts: {err}") from err
    if rejected:
        raise UsageError("--layouts: " + "; ".join(
            f"layout {lay} cannot run model {cfg.name or cfg.family}: " + "; ".join(reasons)
            for lay, reasons in rejected))
    return named


def _check_size(cfg, hw, rules: Rules, args: argparse.Namespace, only: list[Layout] | None = None) -> None:
    """Refuse a sweep of more than MAX_CONFIGS configurations before predicting any."""
    layouts, _ = enumerate_layouts(args.devices, cfg, rules, hw.nvlink_domain, only=only)
    count = len(layouts) * len(args.batch_sizes) * len(args.chunk_sizes)
    if count > MAX_CONFIGS:
        raise UsageError(f"the sweep has {count:_} configurations ({len(layouts)} layouts x {len(args.batch_sizes)} "
                         f"batch sizes x {len(args.chunk_sizes)} chunk sizes), more than {MAX_CONFIGS:_}; pass fewer "
                         f"--batch-sizes / --chunk-sizes or tighten the rules")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m moejax.planner.cli --model ... --hardware ... --devices N`.

    The same as `moejax plan ...`: one-line errors, exit status 2 on a user mistake.
    """
    parser = Parser(prog="moejax plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    add_debug(parser)
    return run_main(lambda args: run(parser.parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
