"""`moejax sweep` and `moejax bench serve`: measured runs of one workload, over many configurations or one.

    moejax sweep --model tiny-moe --layouts all --chunk-sizes 16,32 --max-running 8 \\
        --input-len 8:24 --output-len 8 --num-requests 16 --reference-layout DP1 --out out/sweep
    moejax bench serve --model tiny-moe --layout DP2TP2EP2 --chunk-size 32 --max-running 8 --request-rate 50

`sweep` runs every (layout, expert mode, chunk size, max_running, prefix caching) of the lists
(`moejax.bench.sweep`; a split layout such as TP4MTP1EP8, which `--layouts all --split-moe` adds, in expert mode
dp_attention only), writes results.jsonl (the planner's calibration schema), failures.jsonl, results.csv,
comm.csv and the PNG plots into --out, skips configurations already there, and exits 1 if a configuration failed
in this run. `bench serve` runs one configuration and prints a table like `vllm bench serve`. A shared-prefix
workload (`--shared-prefix-len 1024 --num-prefixes 4`) with `--enable-prefix-caching` measures prefix reuse.
`--prefill-layout(s)` serves disaggregated: the prefill model on the first devices, the decode model (--layout) on
the next, each request's KV pages moved between; the rows record the bytes moved per request beside the planner's.

Every mistake in a flag or a named file is one line `moejax: error: ...` and exit status 2, found
before any model is built (a layout larger than the devices: right after JAX starts). On simulated
CPU devices the figures check correctness and communication volume, not speed (the devices share
the host's cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import sys
from pathlib import Path

from moejax.args import (
    ASYNC_SCHEDULING_HELP,
    DEFAULT_LAYOUT,
    UsageError,
    add_dtype,
    check_context,
    check_devices,
    expert_modes,
    int_in,
    int_list,
    read_model_config,
    real_in,
    resolved_dtype,
)
from moejax.bench.results import append_row
from moejax.config import QUANTIZATIONS
from moejax.devices import MAX_SIMULATED_DEVICES

MAX_CONFIGS = 10_000
_GPU_HARDWARE = (("GB200", "gb200-nvl72"), ("B200", "b200"), ("H200", "h200"), ("H100", "h100-sxm"))


def _quantizations(text: str) -> tuple[str | None, ...]:
    """--quantization: comma-separated names, "none" for the float weights (None), in order, each once."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in ("none", "float"):
            part = None
        elif part not in QUANTIZATIONS:
            raise argparse.ArgumentTypeError(f"unknown quantization {part!r}; choose from none, "
                                             f"{', '.join(QUANTIZATIONS)}")
        if part not in out:
            out.append(part)
    return tuple(out)


def _on_off(text: str) -> tuple[bool, ...]:
    """sweep --enable-prefix-caching VALUES: comma-separated on / off, in order, each once."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"expected comma-separated on / off (e.g. off,on), got {text!r}")
        if (part == "on") not in out:
            out.append(part == "on")
    return tuple(out)


def _lengths(text: str):
    from moejax.bench.workload import Lengths

    try:
        return Lengths.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-moe",
                   help="HF checkpoint directory, or a config name in configs/models (random weights; default "
                        "tiny-moe)")
    add_dtype(p)
    p.add_argument("--weights-seed", type=int_in(0), default=0, help="random-weight seed for config-name models")
    p.add_argument("--devices", type=int_in(1, MAX_SIMULATED_DEVICES), default=None,
                   help="simulated CPU devices (default: 8, or the largest layout); on GPU: devices to use for "
                        "--layouts all (default: all)")
    p.add_argument("--hardware", default="auto",
                   help="planner hardware for the calibration rows and predictions: a name in configs/hardware or "
                        "a YAML path; auto: cpu-host on CPU, the GPU's own config otherwise")
    p.add_argument("--efficiency", default=None, help="efficiency factors file (calibration output) for predictions")
    p.add_argument("--page-size", type=int_in(1), default=16, help="KV cache page size")
    p.add_argument("--max-prefill-seqs", type=int_in(1), default=1, help="prefill rows per step per batch shard")
    p.add_argument("--decode-buckets", default="pow2", choices=["pow2", "max"],
                   help="decode batch sizes compiled: powers of two up to the slots (pow2) or only the slots (max)")
    w = p.add_argument_group("workload")
    w.add_argument("--input-len", type=_lengths, default="32", help="prompt tokens: N, or LO:HI uniform (default 32)")
    w.add_argument("--output-len", type=_lengths, default="16", help="output tokens: N, or LO:HI (default 16)")
    w.add_argument("--lengths-file", default=None,
                   help="JSON or CSV of (input_len, output_len) per request, used in order (replaces the two above)")
    w.add_argument("--num-requests", type=int_in(1, 1_000_000), default=32, help="measured requests (default 32)")
    w.add_argument("--warmup-requests", type=int_in(0, 1_000_000), default=None,
                   help="requests served first and left out of the figures (default: max_running)")
    w.add_argument("--concurrency", type=int_in(1, 1_000_000), default=None,
                   help="most requests in flight (default: max_running in a closed loop; unbounded with a rate)")
    w.add_argument("--request-rate", type=real_in(1e-6, 1e9), default=None,
                   help="Poisson arrivals per second (default: closed loop)")
    w.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="workload seed (prompts, lengths, arrivals)")
    w.add_argument("--shared-prefix-len", type=int_in(0, 1_000_000), default=0,
                   help="tokens of a shared prefix each prompt starts with, before its own --input-len tokens "
                        "(0: none; for prefix caching)")
    w.add_argument("--num-prefixes", type=int_in(1, 1_000_000), default=1,
                   help="distinct shared prefixes (random, seeded), used round robin by the requests")


def add_parsers(subparsers) -> list[argparse.ArgumentParser]:
    """Add `sweep` and `bench serve`; returns the two leaf parsers (for the caller's common flags)."""
    sweep = subparsers.add_parser("sweep", help="measure one workload under many layouts x chunk sizes x load",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--layouts", default="all",
                       help="'all' (every valid layout of --devices devices) or comma-separated, e.g. DP8,TP2EP4,"
                            "TP4MTP1EP8")
    sweep.add_argument("--split-moe", action="store_true",
                       help="with --layouts all: also the layouts that split the MoE apart from attention "
                            "(TP{t}MTP{m}EP{e}, the planner's --split-moe), run in expert mode dp_attention only")
    sweep.add_argument("--chunk-sizes", type=int_list(1), default=[64], help="prefill chunk sizes (default 64)")
    sweep.add_argument("--max-running", type=int_list(1), default=[8],
                       help="ServeConfig.max_running values (default 8); a value not a multiple of a layout's batch "
                            "shards is skipped for that layout")
    sweep.add_argument("--expert-mode", "--ep-attention", dest="expert_mode", default=None,
                       help="comma-separated expert modes to run (e.g. dp_attention,replicated_attention); default: "
                            "the model's (--ep-attention, data, replicated: deprecated names, for one release)")
    sweep.add_argument("--microbatches", type=int_list(1), default=None,
                       help="ServeConfig.microbatches values for layouts with stages (e.g. 1,2,4: 1 is the "
                            "sequential schedule); default: the engine's, one group per stage")
    sweep.add_argument("--quantization", type=_quantizations, default="none",
                       help="comma-separated weight quantizations, each run as its own rows: none (the float "
                            f"weights), {', '.join(QUANTIZATIONS)} (e.g. none,int8,int4)")
    sweep.add_argument("--enable-prefix-caching", type=_on_off, nargs="?", const=(True,), default=(False,),
                       metavar="off,on",
                       help="ServeConfig.enable_prefix_caching: alone, on in every configuration; with values, each "
                            "run as its own rows (off,on: every configuration without and with it). Default: off")
    sweep.add_argument("--async-scheduling", action="store_true", help=ASYNC_SCHEDULING_HELP)
    sweep.add_argument("--prefill-layouts", default=None,
                       help="disaggregated serving: comma-separated prefill layouts, each paired with every --layouts "
                            "layout whose size fits the devices beside it (prefill on the first devices, decode on "
                            "the next); none = aggregated (e.g. none,TP4,DP2). Default: aggregated only")
    sweep.add_argument("--reference-layout", default=None,
                       help="run this layout first (e.g. DP1) and check every configuration's greedy tokens against it")
    sweep.add_argument("--out", default="out/sweep", help="output folder (resumed when it exists)")
    sweep.add_argument("--retry-failed", action="store_true", help="run configurations in failures.jsonl again")
    sweep.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar (one line per configuration)")
    _add_common(sweep)
    sweep.set_defaults(func=run_sweep_command)

    bench = subparsers.add_parser("bench", help="measured runs of one configuration",
                                  description="Measured runs. `moejax bench MODE --help` for the options of each.")
    modes = bench.add_subparsers(dest="bench_command", required=True)
    serve = modes.add_parser("serve", help="serve one workload on one configuration and print a summary",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--layout", default=DEFAULT_LAYOUT,
                       help=f"e.g. DP2TP2EP2 or TP4MTP1EP8 (default {DEFAULT_LAYOUT})")
    serve.add_argument("--chunk-size", type=int_in(1), default=64, help="prefill chunk size (default 64)")
    serve.add_argument("--max-running", type=int_in(1), default=8, help="ServeConfig.max_running (default 8)")
    serve.add_argument("--expert-mode", "--ep-attention", dest="expert_mode", default=None,
                       help="expert mode (default: the model's)")
    serve.add_argument("--microbatches", type=int_in(1), default=None,
                       help="ServeConfig.microbatches: pipeline microbatch groups (default: one per stage)")
    serve.add_argument("--enable-prefix-caching", action="store_true",
                       help="reuse the KV pages of cached prompt prefixes (ServeConfig.enable_prefix_caching)")
    serve.add_argument("--async-scheduling", action="store_true", help=ASYNC_SCHEDULING_HELP)
    serve.add_argument("--prefill-layout", default=None,
                       help="disaggregated serving: prefill on a model of this layout on the first devices, decode on "
                            "--layout over the next ones (KV pages moved between)")
    serve.add_argument("--json", action="store_true", help="print the measurement as one JSON object")
    serve.add_argument("--out", default=None, help="append the measurement as a JSON line (calibration schema)")
    _add_common(serve)
    serve.set_defaults(func=run_serve_command)
    for name, (module, text) in _MODULES.items():  # their own parsers: every argument goes to them, --help too
        p = modes.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=functools.partial(_run_module, module, f"moejax bench {name}"))
    return [sweep, serve]


_MODULES = {
    "decode": ("moejax.bench.decode", "decode speed on one CPU device against Hugging Face and the bandwidth limit"),
    "gemm": ("moejax.bench.gemm", "the few-row matmul roofline of this host"),
    "native": ("moejax.bench.native_vs_xla", "each native CPU kernel against its pure-XLA fallback"),
    "compile": ("moejax.bench.compile", "time to place and warm up a model per layout, and its program size"),
    "kv": ("moejax.bench.kv_bytes", "KV cache bytes per token: the runtime's pools, the planner's, a GQA cache's"),
    "kv-quant": ("moejax.bench.kv_quant", "fp8 / int8 KV cache against float KV: greedy tokens, teacher-forced logits"),
    "gpu": ("moejax.bench.gpu", "the first GPU's figures: decode bandwidth, prefill MFU, a sweep, a calibration"),
    "quant": ("moejax.bench.quant", "post-training quantization: accuracy against float, memory against the planner"),
    "disagg": ("moejax.bench.disagg", "disaggregated prefill / decode on a device split: tokens against aggregated, KV "
                                      "bytes moved against the planner"),
}


def _run_module(module: str, prog: str, args: argparse.Namespace) -> int:
    return importlib.import_module(module).main(args.argv, prog=prog)


# ---- host-side checks (before JAX starts) --------------------------------------------------------


def _workload(args, cfg, sweep: bool):
    from moejax.bench.workload import Workload, read_lengths

    if args.num_prefixes > 1 and not args.shared_prefix_len:
        raise UsageError(f"--num-prefixes {args.num_prefixes}: give the prefixes' length with --shared-prefix-len N "
                         f"(N > 0)")
    pairs = None
    if args.lengths_file:
        try:
            pairs = read_lengths(args.lengths_file)
        except ValueError as err:
            raise UsageError(f"--lengths-file: {err}") from err
    workload = Workload(input_len=args.input_len, output_len=args.output_len, pairs=pairs,
                        pairs_source=args.lengths_file, num_requests=args.num_requests,
                        warmup_requests=args.warmup_requests, concurrency=args.concurrency,
                        request_rate=args.request_rate, seed=args.seed,
                        shared_prefix_len=args.shared_prefix_len, num_prefixes=args.num_prefixes)
    flags = ("--shared-prefix-len / " if args.shared_prefix_len else "") + ("--lengths-file" if pairs
                                                                            else "--input-len / --output-len")
    try:
        workload.check(cfg.vocab_size, cfg.max_position_embeddings)
    except ValueError as err:
        raise UsageError(f"{flags}: {err}") from err
    if workload.min_output_len < 2:
        raise UsageError(f"{flags}: every request needs at least 2 output tokens for TPOT (the calibration schema "
                         f"needs it), got a minimum of {workload.min_output_len}")
    return workload


def _modes(text: str | None, flag: str) -> tuple[str | None, ...]:
    return (None,) if text is None else expert_modes(text, flag)


def _check_modes(layouts: list, modes: tuple[str | None, ...], flag: str = "--expert-mode") -> None:
    """Refuse a layout that none of `modes` runs (a split layout runs in 'dp_attention' only): `Parallelism`'s
    reason, one line. None: the model's default mode."""
    from moejax.sharding import Parallelism

    for layout in layouts:
        errors = []
        for mode in modes:
            try:
                Parallelism(layout, mode or Parallelism.expert_mode)
            except ValueError as err:
                errors.append(err)
        if len(errors) == len(modes):
            raise UsageError(f"{flag}: {errors[0]}")


def _layouts(text: str, cfg, flag: str) -> list | None:
    """Parsed and validated layouts, or None for 'all' (resolved once the device count is known)."""
    from moejax.mesh import Layout

    if text.strip().lower() == "all":
        return None
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            layout = Layout.parse(part).validate(cfg)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from err
        if layout not in out:
            out.append(layout)
    if not out:
        raise UsageError(f"{flag}: no layout given in {text!r}")
    return out


def _prefill_layouts(args, cfg, flag: str) -> tuple:
    """--prefill-layout(s): layouts (None: aggregated, "none" in the list), refused with async scheduling (the
    disaggregated engine does not run it yet)."""
    text = getattr(args, flag[2:].replace("-", "_"))
    if text is None:
        return (None,)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    named = [p for p in parts if p.lower() != "none"]
    layouts = _layouts(",".join(named), cfg, flag) if named else []
    if layouts is None:
        raise UsageError(f"{flag}: name the prefill layouts (e.g. none,TP4,DP2), not 'all'")
    out = ([None] if len(named) < len(parts) else []) + layouts
    if any(x is not None for x in out) and args.async_scheduling:
        raise UsageError(f"{flag}: disaggregated serving does not run with --async-scheduling yet; drop one")
    if not out:
        raise UsageError(f"{flag}: no layout given in {text!r}")
    return tuple(out)


def _check_out_file(path: Path, flag: str) -> None:
    """Refuse a file to append to that cannot be: a folder, a file not writable, a folder that cannot be made."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file to append JSON lines to")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")
    _check_folder(path.parent, flag, named=path)


def _check_folder(path: Path, flag: str, named: Path | None = None) -> None:
    """Refuse a folder that cannot be created or written to (nothing is created here); `named`: the flag's value."""
    path, existing = named or path, path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {existing} is not writable")


def _check_hardware(args) -> None:
    from moejax.planner.hardware import load_hardware

    if args.hardware != "auto" or args.efficiency:  # auto is resolved once JAX runs: check the factors file now
        hardware = "cpu-host" if args.hardware == "auto" else args.hardware
        load_hardware(hardware, efficiency=args.efficiency)  # FileNotFoundError / ValueError name the file


def _resolve_hardware(args, device) -> str:
    if args.hardware != "auto":
        return args.hardware
    if device.platform == "cpu":
        return "cpu-host"
    for tag, name in _GPU_HARDWARE:
        if tag in device.device_kind.upper():
            return name
    from moejax.planner.hardware import list_hardware

    raise UsageError(f"--hardware auto: no built-in config for device kind {device.device_kind!r}; pass --hardware "
                     f"NAME (built-in: {list_hardware()}) or a YAML path")


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A disaggregated run's devices: the prefill layout's first, then the decode layout's (`check_devices` reads
    `size` and the name; `moejax generate` and `bench serve`)."""

    prefill: object
    decode: object

    @property
    def size(self) -> int:
        return self.prefill.size + self.decode.size

    def __str__(self) -> str:
        return f"{self.prefill} (prefill) + {self.decode} (decode)"


def _start_jax(layouts: list, devices_flag: int | None):
    """Simulate CPU devices as needed, start JAX, and refuse layouts larger than the devices."""
    from moejax.devices import request_cpu_devices

    need = max([lay.size for lay in layouts] + [devices_flag or 8])
    simulated = request_cpu_devices(need)
    import jax

    devices = jax.devices()
    for layout in layouts:
        check_devices(layout, devices, simulated)
    return devices


# ---- moejax sweep --------------------------------------------------------------------------------


def run_sweep_command(args: argparse.Namespace) -> int:
    """`moejax sweep`: check everything on the host, then run the sweep and print its summary."""
    from moejax.bench.sweep import SweepSpec, format_summary, read_rows, run_sweep
    from moejax.mesh import Layout

    cfg = read_model_config(args.model)
    cfg.check_runtime_support()
    dtype = resolved_dtype(args.dtype, cfg)  # "auto": the model's own, recorded as such in every row
    workload = _workload(args, cfg, sweep=True)
    layouts = _layouts(args.layouts, cfg, "--layouts")
    reference = _layouts(args.reference_layout, cfg, "--reference-layout") if args.reference_layout else None
    if reference is not None and len(reference) != 1:
        raise UsageError(f"--reference-layout: give one layout, got {args.reference_layout!r}")
    modes = _modes(args.expert_mode, "--expert-mode")
    if args.split_moe and layouts is not None:
        raise UsageError(f"--split-moe adds the split layouts to --layouts all; with --layouts {args.layouts} name "
                         f"them instead (e.g. TP4MTP1EP8)")
    _check_modes(layouts or [], modes)  # the reference runs in the model's default mode
    prefill_layouts = _prefill_layouts(args, cfg, "--prefill-layouts")
    check_context(cfg, [*(("--chunk-size(s)", v) for v in args.chunk_sizes), ("--page-size", args.page_size)])
    _check_hardware(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    _check_folder(out, "--out")
    for name in ("results.jsonl", "failures.jsonl"):
        read_rows(out / name)  # a malformed file is refused now, not after the first configuration
    devices = _start_jax((layouts or []) + (reference or []) + [x for x in prefill_layouts if x is not None],
                         args.devices)
    if layouts is None:
        n = args.devices or len(devices)
        layouts = Layout.enumerate(n, cfg, split_moe=args.split_moe)
        if not layouts:
            raise UsageError(f"--layouts all: no layout of {n} devices can run {cfg.name}")
        _check_modes(layouts, modes, "--split-moe")  # some mode must run the split layouts
        _start_jax(layouts, args.devices)
    microbatches = tuple(args.microbatches) if args.microbatches else (None,)
    count = (len(layouts) * len(modes) * len(args.quantization) * len(microbatches) * len(args.chunk_sizes)
             * len(args.max_running) * len(args.enable_prefix_caching) * len(prefill_layouts))
    if count > MAX_CONFIGS:
        raise UsageError(f"the sweep has {count:_} configurations, more than {MAX_CONFIGS:_}; pass fewer values")
    if args.microbatches and not any(lay.stage > 1 for lay in layouts):
        raise UsageError(f"--microbatches {','.join(map(str, args.microbatches))}: no layout has pipeline stages "
                         f"({', '.join(str(x) for x in layouts)}); add a layout with PP > 1, or drop --microbatches")
    runnable = [(lay, mr) for lay in layouts for m in (microbatches if lay.stage > 1 else (None,))
                for mr in args.max_running if mr % (lay.data * (m or lay.stage)) == 0]
    if not runnable:
        raise UsageError(f"--max-running {','.join(map(str, args.max_running))}: no value is a multiple of the data "
                         f"factor x pipeline microbatch groups of any layout ({', '.join(str(x) for x in layouts)})")
    spec = SweepSpec(model=args.model, layouts=tuple(layouts), chunk_sizes=tuple(args.chunk_sizes),
                     max_running=tuple(args.max_running), workload=workload,
                     hardware=_resolve_hardware(args, devices[0]), expert_mode=modes, dtype=dtype,
                     seed=args.weights_seed, page_size=args.page_size, max_prefill_seqs=args.max_prefill_seqs,
                     decode_buckets=args.decode_buckets, reference_layout=reference[0] if reference else None,
                     efficiency=args.efficiency, microbatches=microbatches, quantization=args.quantization,
                     prefix_caching=args.enable_prefix_caching, async_scheduling=args.async_scheduling,
                     prefill_layouts=prefill_layouts)
    result = run_sweep(spec, out, progress=not args.no_progress, retry_failed=args.retry_failed,
                       plots=not args.no_plot)
    print(format_summary(result))
    return 1 if result.failures else 0


# ---- moejax bench serve --------------------------------------------------------------------------


def run_serve_command(args: argparse.Namespace) -> int:
    """`moejax bench serve`: one configuration, a vllm-style summary (or one JSON object)."""
    import jax

    from moejax.bench import sweep as sweep_lib
    from moejax.bench.serve import format_result
    from moejax.planner.hardware import load_hardware
    from moejax.progress import Progress

    cfg = read_model_config(args.model)
    cfg.check_runtime_support()
    dtype = resolved_dtype(args.dtype, cfg)
    workload = _workload(args, cfg, sweep=False)
    layouts = _layouts(args.layout, cfg, "--layout")
    if layouts is None or len(layouts) != 1:
        raise UsageError(f"--layout: give one layout, got {args.layout!r}; `moejax sweep` runs many")
    (layout,) = layouts
    modes = _modes(args.expert_mode, "--expert-mode")
    if len(modes) > 1:
        raise UsageError("--expert-mode: give one mode; `moejax sweep` runs several")
    mode = modes[0]
    _check_modes([layout], modes)
    check_context(cfg, (("--chunk-size(s)", args.chunk_size), ("--page-size", args.page_size)))
    if args.microbatches is not None and layout.stage == 1:
        raise UsageError(f"--microbatches {args.microbatches}: layout {layout} has no pipeline stages; give a layout "
                         f"with PP > 1, or drop --microbatches")
    groups_used = args.microbatches or layout.stage
    if args.max_running % (layout.data * groups_used):
        groups = f" x its {groups_used} pipeline microbatch groups" if groups_used > 1 else ""
        raise UsageError(f"--max-running {args.max_running} must be a multiple of the data factor of {layout} "
                         f"({layout.data}){groups}")
    (prefill_layout,) = _prefill_layouts(args, cfg, "--prefill-layout")
    _check_hardware(args)
    if args.out:
        _check_out_file(Path(args.out), "--out")
    devices = _start_jax([layout if prefill_layout is None else DeviceSplit(prefill_layout, layout)], args.devices)
    spec = sweep_lib.SweepSpec(model=args.model, layouts=(layout,), chunk_sizes=(args.chunk_size,),
                               max_running=(args.max_running,), workload=workload,
                               hardware=_resolve_hardware(args, devices[0]), expert_mode=(mode,), dtype=dtype,
                               seed=args.weights_seed, page_size=args.page_size,
                               max_prefill_seqs=args.max_prefill_seqs, decode_buckets=args.decode_buckets,
                               efficiency=args.efficiency, async_scheduling=args.async_scheduling)
    hw = load_hardware(spec.hardware, efficiency=args.efficiency)
    progress = Progress()  # stderr: the summary and --json go to stdout
    prefill_model = None
    if prefill_layout is not None:  # the prefill model on the first devices, the decode model on the next
        n = prefill_layout.size
        with progress.phase(f"placing {spec.model} on layout {prefill_layout} (prefill)"):
            prefill_model = sweep_lib._build_model(spec, str(prefill_layout), mode)
        with progress.phase(f"placing {spec.model} on layout {layout} (decode, the next {layout.size} devices)"):
            model = sweep_lib._build_model(spec, str(layout), mode, devices=devices[n:n + layout.size])
    else:
        with progress.phase(f"placing {spec.model} on layout {layout}"):
            model = sweep_lib._build_model(spec, str(layout), mode)
    shards = sweep_lib.batch_shards(model)
    if args.max_running % (shards * groups_used):
        groups = f" x {groups_used} pipeline microbatch groups" if groups_used > 1 else ""
        raise UsageError(f"--max-running {args.max_running} must be a multiple of the {shards} batch shards{groups} "
                         f"of {layout} in expert mode {model.expert_mode!r}")
    counter = sweep_lib._CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        row, _ = sweep_lib.run_config(spec, model, args.chunk_size, args.max_running, hw, counter,
                                      args.microbatches, progress, args.enable_prefix_caching, prefill_model)
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    row["expert_mode_requested"] = mode or sweep_lib.DEFAULT
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        append_row(Path(args.out), row)  # whole, as the sweep's rows: a ^C never leaves half a line
    if args.json:
        json.dump(row, sys.stdout)
        sys.stdout.write("\n")
        return 0
    decode = row["comm"]["decode"]
    split = f"{row['prefill_layout']} + " * (prefill_model is not None)
    header = [("Model", cfg.name), ("Layout", f"{split}{row['layout']} ({row['devices']} {row['platform']})"),
              ("Expert mode", row["expert_mode"]), ("Dtype", row["dtype"]),
              ("Chunk size / max running", f"{args.chunk_size} / {args.max_running}"),
              ("Prefix caching", "on" if args.enable_prefix_caching else "off"),
              ("Async scheduling", "on" if args.async_scheduling else "off"),
              ("Compile time (s)", f"{row['compile_s']:.2f}"),
              ("Warm-up requests (s)", f"{row['warmup_requests_s']:.2f}"),
              ("Program memory per device (MiB)", f"{row['peak_memory_bytes'] / 2**20:.1f}"),
              ("Decode step comm per device (KiB)", f"{decode['wire_bytes'] / 1024:.1f}")]
    if prefill_model is not None:
        measured, planner = row["kv_transfer_bytes_per_request"], row["planner_kv_transfer_bytes_per_request"]
        header += [("Prefill / decode devices", f"{row['prefill_devices']} / {row['decode_devices']}"),
                   ("KV moved per request (B)", "n/a" if measured is None else f"{measured:.0f}"),
                   ("Planner KV per request (B)", "n/a" if planner is None else f"{planner:.0f}")]
    print(format_result(row, header=header))  # the row carries every key of RunResult.metrics()
    if decode["weight_moves"] or row["comm"]["prefill"]["weight_moves"]:
        print("WARNING: the compiled step moves weights: " + "; ".join(decode["weight_moves"]
                                                                       + row["comm"]["prefill"]["weight_moves"]))
    if row["platform"] == "cpu":
        print(f"note: {sweep_lib.CPU_CAVEAT}.")
    return 0
