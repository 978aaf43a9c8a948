"""Layout sweep: one workload under many layouts x expert modes x quantizations x chunk sizes x max-running
(x prefix caching off / on), measured.

For each configuration: build the engine on the layout's placed model (placed once per layout and
expert mode), warm it up (compile time reported apart), read the collectives of its decode step and
prefill chunk from the compiled HLO (`moejax.bench.comm`), serve the workload's warm-up requests,
then the measured ones (`moejax.bench.serve`), and append one JSON line. A quantization (`moejax.quant`: "int8",
"fp8", "int4"; None: the float weights) is placed as its own model, and its rows carry it as `quantization` and as
the planner's weight `precision`.

Disaggregated configurations (`SweepSpec.prefill_layouts`: a prefill layout beside the decode layout,
`Engine(..., prefill_model=...)`): the prefill model is placed on the first devices, the decode model on the next
ones (a pair larger than the devices is skipped, named). Their rows record `prefill_layout` (part of the key; None:
aggregated), `prefill_devices`, `decode_devices`, `devices` = both, the KV moved per request measured
(`kv_transfer_bytes_per_request`: bytes moved / requests whose KV moved, over the measured requests) and the
planner's for the same requests (`planner_kv_transfer_bytes_per_request`: `moejax.planner.disagg.kv_transfer_bytes`
at each moved request's prompt length, averaged). Their compiled-program and collective accounting (`comm`,
`peak_memory_bytes`, `planner_comm`) is per phase on the model that runs it: decode on the decode model, prefill
on the prefill model; they get no aggregated `predicted`.

Output folder (`run_sweep(..., out_dir)`):

- `results.jsonl`: one line per measured configuration, in the planner's calibration schema
  (`moejax.planner.calibrate`: model, hardware, layout, precision, batch_size = max_running,
  chunk_size, isl / osl = the workload's mean lengths, ttft_s, tpot_s, tokens_per_s_per_device,
  tokens_per_s_per_user, expert_mode) plus everything else measured (percentiles, compile time,
  memory, communication, the prefix cache's prompt / cached / prefill tokens and hit rate, the planner's
  prediction (given the measured hit rate as its `prefix_hit_rate`), a digest of the greedy output tokens).
- `failures.jsonl`: one line per configuration that raised, with the error; the sweep goes on.
- `results.csv`, `comm.csv`: flat tables of both; `tradeoff.png`, `latency_vs_chunk.png` (`plots`).
  (`moejax.bench.results` reads and writes these files.)

Re-running with the same folder skips every configuration already in `results.jsonl` or
`failures.jsonl` (same model, platform, layout, expert mode, chunk, max_running, dtype, engine
knobs, prefix caching and workload), so an interrupted sweep resumes; `retry_failed` runs the failed ones again.
A configuration whose max_running is not a multiple of the model's batch shards is skipped, named.

Nothing here depends on how a layout is run: batch shards come from the engine, the expert mode
from the model, and every collective from the compiled program, so a new parallel mode needs no
change. A split layout (`TP4MTP1EP8`: the MoE split apart from attention) runs in the 'dp_attention' expert
mode only, so a sweep over several modes pairs it with that one. On simulated CPU devices the figures check
correctness and communication volume, never speed: the devices share the host's cores (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moejax import interrupt, quant
from moejax.bench import comm
from moejax.bench.results import LAYER_SCOPES, append_row, key_of, read_rows, write_tables
from moejax.bench.serve import Collector, RunResult, serve
from moejax.bench.workload import Workload
from moejax.mesh import Layout

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}  # planner names (f16: same bytes as bf16)
DEFAULT = "default"  # expert_mode_requested when the model's own default mode is used
CPU_CAVEAT = ("simulated CPU devices share the host's cores: these figures check correctness and communication "
              "volume, not which layout is faster")
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep.

    Attributes:
        model: a config name in configs/models, a YAML path or a checkpoint directory (as `moejax.load` takes).
        layouts: layouts to run.
        chunk_sizes: prefill chunk sizes.
        max_running: ServeConfig.max_running values (requests running at once over the mesh).
        workload: the requests (`moejax.bench.workload.Workload`).
        hardware: planner hardware name for the calibration rows and predictions (e.g. 'cpu-host').
        expert_mode: expert modes to run (`Model(expert_mode=...)`); None: the model's default.
        dtype: serving dtype: "auto" (the model's own: a checkpoint's torch_dtype, a built-in config's dtype;
            resolved here, so the rows record the concrete one) or a name of `moejax.config.SERVING_DTYPES`.
            seed: random-weight seed (config-name models).
        page_size, max_prefill_seqs: ServeConfig knobs, fixed over the sweep.
        decode_buckets: 'pow2' (the engine's powers of two up to the slots) or 'max' (one bucket: fewer compiles).
        reference_layout: run first (e.g. DP1); every row records whether its greedy tokens equal it.
        microbatches: ServeConfig.microbatches values (pipeline microbatch groups); None: the engine's default
            (one per stage). Rows record the value asked for (`microbatches_requested`, part of the key: None
            for rows written before this field) and the groups used (`microbatches`, what the planner reads).
        quantization: weight quantizations to run (`moejax.load(quantization=...)`); None: the float weights
            (part of the key: rows written before this field are float rows).
        efficiency: efficiency factors file for the planner's predictions (calibration output).
        prefix_caching: ServeConfig.enable_prefix_caching values, each run as its own rows (recorded as
            `enable_prefix_caching`, part of the key: rows written before this field ran without it).
        async_scheduling: ServeConfig.async_scheduling in every configuration (recorded, part of the key: rows
            written before this field ran without it).
        prefill_layouts: prefill layouts paired with every layout (disaggregated serving, see the module
            docstring); None: aggregated. Not with prefix caching or async scheduling.
    """

    model: str
    layouts: tuple[Layout, ...]
    chunk_sizes: tuple[int, ...] = (64,)
    max_running: tuple[int, ...] = (8,)
    workload: Workload = Workload()
    hardware: str = "cpu-host"
    expert_mode: tuple[str | None, ...] = (None,)
    dtype: str = "auto"
    seed: int = 0
    page_size: int = 16
    max_prefill_seqs: int = 1
    decode_buckets: str = "pow2"
    reference_layout: Layout | None = None
    efficiency: str | None = None
    microbatches: tuple[int | None, ...] = (None,)
    quantization: tuple[str | None, ...] = (None,)
    prefix_caching: tuple[bool, ...] = (False,)
    async_scheduling: bool = False
    prefill_layouts: tuple[Layout | None, ...] = (None,)

    def __post_init__(self):
        if self.decode_buckets not in ("pow2", "max"):
            raise ValueError(f"decode_buckets must be 'pow2' or 'max', got {self.decode_buckets!r}")
        if self.dtype == "auto":  # once, on the host: every row and key holds the concrete dtype
            from moejax.args import read_model_config
            from moejax.config import resolve_dtype

            object.__setattr__(self, "dtype", resolve_dtype(self.dtype, read_model_config(self.model)))
        if self.dtype not in PRECISION:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(PRECISION)}, got {self.dtype!r}")
        for name in ("layouts", "chunk_sizes", "max_running", "expert_mode", "microbatches", "quantization",
                     "prefix_caching", "prefill_layouts"):
            if not getattr(self, name):
                raise ValueError(f"SweepSpec.{name} is empty")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"SweepSpec.async_scheduling must be a bool, got {self.async_scheduling!r}")
        if not all(isinstance(v, bool) for v in self.prefix_caching):
            raise ValueError(f"SweepSpec.prefix_caching must hold booleans, got {self.prefix_caching!r}")
        for q in self.quantization:
            if q is not None:
                quant.scheme(q)  # ValueError naming the known ones
        if any(p is not None for p in self.prefill_layouts) and self.async_scheduling:
            raise ValueError("SweepSpec.prefill_layouts (disaggregated serving) do not run with "
                             "async scheduling yet")
        split = [str(lay) for lay in self.layouts if lay.split]
        if split and not any(_runs_split(mode) for mode in self.expert_mode):
            raise ValueError(f"layouts {', '.join(split)} split the MoE apart from attention and run only in expert "
                             f"mode 'dp_attention', which the sweep's modes {list(self.expert_mode)} leave out")

    @property
    def max_len(self) -> int:
        return self.workload.max_total_len

    def configs(self) -> list[dict]:
        """Every (layout, prefill layout, expert mode, quantization, microbatches, max_running, chunk, prefix caching)
        to run,
        reference first (float weights, unless every run is quantized: then the first quantization; prefix caching
        off, unless every run has it on), as key dicts (no platform).
        Microbatch values other than the default apply to layouts with stages only; a split layout (`TP4MTP1EP8`)
        pairs with the modes it runs in only (dp_attention, or the model's default, which is it)."""
        out = []
        if self.reference_layout is not None:
            ref_q = None if None in self.quantization else self.quantization[0]
            out.append(self._config(self.reference_layout, None, self.chunk_sizes[0], self.max_running[0], None,
                                    ref_q, False not in self.prefix_caching))
        for layout in self.layouts:
            for mode in (m for m in self.expert_mode if not layout.split or _runs_split(m)):
                for q in self.quantization:
                    for m in self.microbatches if layout.stage > 1 else (None,):
                        for mr in self.max_running:
                            for chunk in self.chunk_sizes:
                                for cache in self.prefix_caching:
                                    for prefill in self.prefill_layouts:
                                        cfg = self._config(layout, mode, chunk, mr, m, q, cache, prefill)
                                        if cfg not in out:
                                            out.append(cfg)
        return out

    def _config(self, layout: Layout, mode: str | None, chunk: int, mr: int, microbatches: int | None,
                quantization: str | None = None, prefix_caching: bool = False,
                prefill_layout: Layout | None = None) -> dict:
        return {"model": self.model, "layout": str(layout), "expert_mode_requested": mode or DEFAULT,
                "chunk_size": chunk, "max_running": mr, "dtype": self.dtype, "page_size": self.page_size,
                "max_prefill_seqs": self.max_prefill_seqs, "decode_buckets": self.decode_buckets,
                "workload_id": self.workload.workload_id, "microbatches_requested": microbatches,
                "quantization": quantization, "enable_prefix_caching": prefix_caching,
                "async_scheduling": self.async_scheduling,
                "prefill_layout": None if prefill_layout is None else str(prefill_layout)}


def _runs_split(mode: str | None) -> bool:
    """Whether a split layout runs in expert mode `mode` (None: the model's default, 'dp_attention')."""
    return mode in (None, "dp_attention")


@dataclass
class SweepResult:
    """What a sweep run produced (rows of this spec: measured now or found in the folder)."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    skipped: list[tuple[dict, str]] = field(default_factory=list)  # (config, why)
    measured: int = 0  # configurations run in this call
    outputs: dict[tuple, list[list[int]]] = field(default_factory=dict)  # key -> greedy outputs (this call)
    reference_digest: str | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    platform: str = ""
    seconds: float = 0.0


# ---- one configuration -------------------------------------------------------------------------


class _CompileCounter:
    """Counts compilations (and their seconds) while active, from jax.monitoring events."""

    def __init__(self):
        self.count, self.seconds, self._on = 0, 0.0, False

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if self._on and event in _COMPILE_EVENTS:
            self.seconds += duration
            self.count += event == _COMPILE_EVENTS[0]

    def __enter__(self):
        self.count, self.seconds, self._on = 0, 0.0, True
        return self

    def __exit__(self, *exc):
        self._on = False


def batch_shards(model) -> int:
    """Request groups of the model (data, or data x expert in the 'dp_attention' expert mode)."""
    return getattr(model, "batch_shards", model.layout.data)


def _serve_config(spec: SweepSpec, model, chunk: int, mr: int, microbatches: int | None = None,
                  prefix_caching: bool = False):
    import moejax
    from moejax.kv_cache import pages_for

    shards = batch_shards(model)
    slots = mr // (shards * (microbatches or model.layout.stage))  # per data group and microbatch group
    # One pool size per model (the most slots any max_running needs): the cache shape, and so the compiled
    # step, is then shared by every configuration of this layout.
    pool = math.ceil(max(spec.max_running) / shards) * pages_for(spec.max_len, spec.page_size)
    return moejax.ServeConfig(max_running=mr, page_size=spec.page_size, num_pages=pool, chunk_size=chunk,
                              max_prefill_seqs=spec.max_prefill_seqs, max_model_len=spec.max_len,
                              decode_buckets=(slots,) if spec.decode_buckets == "max" else None,
                              microbatches=microbatches, enable_prefix_caching=prefix_caching,
                              async_scheduling=spec.async_scheduling)


def run_config(spec: SweepSpec, model, chunk: int, mr: int, hw, counter: _CompileCounter,
               microbatches: int | None = None, progress=None, prefix_caching: bool = False,
               prefill_model=None) -> tuple[dict, RunResult]:
    """Build, warm up, account and serve one configuration on a placed model (with a `prefill_model` on other
    devices: disaggregated, `model` decodes); returns (row, result).

    The row's `prefix_hit_rate` (measured: cached / admitted prompt tokens) is the planner's `prefix_hit_rate` in
    its prediction (`predicted`), as in any calibration row.

    `progress` (a `moejax.progress.Progress`, or None for nothing) shows the compile, with a line per program
    compiled, and the serving as phases on stderr.
    """
    import jax

    import moejax
    from moejax.progress import Progress

    progress = progress or Progress(enabled=False)
    collector = Collector()
    engine = moejax.Engine(model, _serve_config(spec, model, chunk, mr, microbatches, prefix_caching),
                           on_finish=collector, prefill_model=prefill_model)
    buckets = ", ".join(map(str, engine.decode_buckets))
    t0 = time.perf_counter()
    with counter, progress.compiling(f"compiling the steps: prefill ({engine.config.max_prefill_seqs} x {chunk} "
                                     f"tokens), decode (batch {buckets}), and reading their collectives"):
        engine.warmup()
        warmup_s = time.perf_counter() - t0
        accounts = comm.account(engine)
    compile_s, compiles = counter.seconds, counter.count
    warm, measured = spec.workload.warmup_count(mr), spec.workload.num_requests
    with counter, progress.phase(f"serving {warm} warm-up and {measured} measured requests"):
        result, warm_requests_s = serve(engine, collector, spec.workload)
    metrics = result.metrics()
    if metrics["tpot_s"] is None or not metrics["ttft_s"]:
        raise RuntimeError("no request made two tokens, so TPOT is undefined; use output lengths >= 2")
    cfg, layout, quantization = model.cfg, model.layout, model.steps.quantization
    isl, osl = spec.workload.mean_lengths(cfg.vocab_size)
    act_bytes = jax.numpy.dtype(model.dtype).itemsize
    # each phase on the model that runs it (disaggregated: prefill on the prefill model, the sequential schedule)
    runs = {"decode": (model, engine.pipelined), "prefill": (prefill_model or model, engine.pipelined and not
                                                            prefill_model)}
    planner = {phase: comm.planner_volume(cfg, runs[phase][0].layout, runs[phase][0].expert_mode,
                                          accounts["tokens"][phase], act_bytes, hw, pipelined=runs[phase][1])
               for phase in ("decode", "prefill")}
    placed = [model] + ([prefill_model] if prefill_model is not None else [])
    device_peak = [d.memory_stats().get("peak_bytes_in_use") for m in placed for d in m.mesh.devices.flat
                   if d.memory_stats()]
    row = {
        "model": spec.model, "hardware": spec.hardware, "layout": str(layout),
        "precision": quantization or PRECISION[spec.dtype], "kv_precision": PRECISION[spec.dtype],
        "batch_size": mr, "chunk_size": chunk, "isl": isl, "osl": osl,
        "ttft_s": metrics["ttft_s"], "tpot_s": metrics["tpot_s"],
        "tokens_per_s_per_device": metrics["tokens_per_s_per_device"],
        "tokens_per_s_per_user": metrics["tokens_per_s_per_user"], "expert_mode": model.expert_mode,
        # the configuration (KEY_FIELDS) and context
        "expert_mode_requested": None, "max_running": mr, "dtype": spec.dtype, "page_size": spec.page_size,
        "max_prefill_seqs": spec.max_prefill_seqs, "decode_buckets": spec.decode_buckets,
        "workload_id": spec.workload.workload_id, "workload": spec.workload.describe(),
        "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
        "devices": result.devices, "batch_shards": engine.groups, "decode_bucket_sizes": list(engine.decode_buckets),
        "microbatches_requested": microbatches, "microbatches": engine.microbatches, "quantization": quantization,
        "enable_prefix_caching": prefix_caching, "async_scheduling": spec.async_scheduling,
        **{k: v for k, v in metrics.items() if k not in ("ttft_s", "tpot_s", "tokens_per_s_per_device",
                                                         "tokens_per_s_per_user")},
        "warmup_s": warmup_s, "compile_s": compile_s, "compilations": compiles,
        "compilations_during_run": counter.count, "warmup_requests_s": warm_requests_s,
        "peak_memory_bytes": accounts["program_bytes"],
        "device_peak_bytes_in_use": max(device_peak) if device_peak else None,
        "comm": {phase: accounts[phase] for phase in ("decode", "prefill")}, "comm_tokens": accounts["tokens"],
        "planner_comm": planner, "output_digest": result.output_digest,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    row.update(_transfer_fields(spec, model, prefill_model, result))
    row["predicted"] = None if prefill_model is not None else _predicted(row, hw)  # the planner's is aggregated
    return row, result


def _transfer_fields(spec: SweepSpec, model, prefill_model, result: RunResult) -> dict:
    """A row's disaggregation fields: the split and the KV moved per request, measured and the planner's (its
    `kv_transfer_bytes` at each moved request's prompt length, averaged); None for an aggregated run."""
    from moejax.planner.disagg import kv_transfer_bytes
    from moejax.planner.workload import Workload as PlanWorkload

    if prefill_model is None:
        return {"prefill_layout": None, "prefill_devices": 0, "decode_devices": model.layout.size,
                "kv_transfers": 0, "kv_transfer_bytes_per_request": None,
                "planner_kv_transfer_bytes_per_request": None}
    moved = [r for r in result.records if r.kv_bytes_moved]
    kv_precision = PRECISION[spec.dtype]  # the pools hold the serving dtype (the sweep sets no KV format)
    planner = [kv_transfer_bytes(model.cfg, PlanWorkload(isl=r.input_len, osl=r.max_new_tokens,
                                                         kv_precision=kv_precision), spec.page_size) for r in moved]
    return {"prefill_layout": str(prefill_model.layout), "prefill_devices": prefill_model.layout.size,
            "decode_devices": model.layout.size, "kv_transfers": result.kv_transfers,
            "kv_transfer_bytes": result.kv_transfer_bytes,
            "kv_transfer_bytes_per_request": result.kv_transfer_bytes / len(moved) if moved else None,
            "planner_kv_transfer_bytes_per_request": sum(planner) / len(planner) if planner else None}


def _predicted(row: dict, hw) -> dict | None:
    from moejax.planner.calibrate import predict_measurement

    try:
        p = predict_measurement(row, hw)
    except (ValueError, KeyError, FileNotFoundError):
        return None
    return {"ttft_s": p.ttft_s, "tpot_s": p.tpot_s, "tokens_per_s_per_device": p.tokens_per_s_per_device,
            "tokens_per_s_per_user": p.tokens_per_s_per_user, "feasible": p.feasible}


# ---- the sweep ---------------------------------------------------------------------------------


def _build_model(spec: SweepSpec, layout: str, mode: str | None, quantization: str | None = None, devices=None):
    """The placed model (on `devices`, default the first of the layout's size)."""
    from pathlib import Path as _P

    import moejax

    kwargs = {"layout": layout, "dtype": spec.dtype, "quantization": quantization}
    if devices is not None:
        kwargs["devices"] = devices
    if mode is not None:
        kwargs["expert_mode"] = mode
    if _P(spec.model).is_dir():
        return moejax.load(spec.model, **kwargs)
    return moejax.Model.random(moejax.load_model_config(spec.model), seed=spec.seed, **kwargs)


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, progress: bool = True, retry_failed: bool = False,
              models: dict | None = None, plots: bool = True, log: Callable[[str], None] = print) -> SweepResult:
    """Run every configuration of `spec` not yet in `out_dir`; write JSON lines, CSV and plots there.

    Args:
        spec: what to sweep.
        out_dir: the output folder (created); its results are resumed (see the module docstring).
        progress: show a progress bar (rich) with the current configuration and an ETA.
        retry_failed: run configurations recorded in failures.jsonl again.
        models: a dict reused across calls to keep placed models (and their compiled steps) by
            (model, layout, mode, dtype, seed); None: placed per call and freed after each layout.
        plots: write the PNG plots.
        log: where one line per configuration goes.

    Returns:
        A SweepResult; `rows` holds this spec's measured rows (found or new) in configuration order.
    """
    import jax

    from moejax.planner.hardware import load_hardware

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path, failures_path = out / "results.jsonl", out / "failures.jsonl"
    done = {key_of(r): r for r in read_rows(results_path)}
    failed = {key_of(r): r for r in read_rows(failures_path)}
    hw = load_hardware(spec.hardware, efficiency=spec.efficiency)
    platform = jax.devices()[0].platform
    res = SweepResult(platform=platform)
    configs = [{**c, "platform": platform} for c in spec.configs()]
    todo = []
    for c in configs:
        k = key_of(c)
        if k in done:
            res.skipped.append((c, "already in results.jsonl"))
        elif k in failed and not retry_failed:
            res.skipped.append((c, "failed before (failures.jsonl); pass retry_failed to run it again"))
        else:
            todo.append(c)
    ref = configs[0] if spec.reference_layout is not None else None
    if ref is not None and key_of(ref) in done:
        res.reference_digest = done[key_of(ref)]["output_digest"]
    counter = _CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    own = models is None
    models = {} if own else models
    bar = _Progress(len(todo), progress)
    try:
        with bar:
            for i, c in enumerate(todo):
                bar.start(c)
                row = _run_one(spec, c, models, hw, counter, res, failures_path, bar.log if progress else log,
                               bar.phases())
                if row is not None:
                    if c is ref:
                        res.reference_digest = row["output_digest"]
                    row["tokens_match_reference"] = (None if res.reference_digest is None
                                                     else row["output_digest"] == res.reference_digest)
                    append_row(results_path, row)
                    done[key_of(row)] = row
                bar.advance()
                later = {k for x in todo[i + 1:] for k in _model_keys(spec, x)}
                if own and any(k not in later for k in _model_keys(spec, c)):
                    for k in _model_keys(spec, c):  # free a layout's weights once its configurations ran
                        if k not in later:
                            models.pop(k, None)
                    gc.collect()
                interrupt.check()  # a ^C that a finalizer swallowed (gc above) stops the sweep here
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    res.rows = [done[key_of(c)] for c in configs if key_of(c) in done]
    for row in res.rows:
        if row.get("tokens_match_reference") is None and res.reference_digest is not None:
            row["tokens_match_reference"] = row["output_digest"] == res.reference_digest
    res.paths = write_tables(out)
    if plots and res.rows:
        from moejax.bench import plots as plots_lib

        res.paths.update(plots_lib.write_plots(res.rows, out, hw))
    res.seconds = time.perf_counter() - start
    return res


def _model_key(spec: SweepSpec, c: dict) -> tuple:
    q = c.get("quantization")  # float models keep the key they always had
    return (spec.model, c["layout"], c["expert_mode_requested"], spec.dtype, spec.seed) + ((q,) if q else ())


def _model_keys(spec: SweepSpec, c: dict) -> list[tuple]:
    """The placed models configuration `c` runs on: its layout's; disaggregated, the prefill layout's (on the first
    devices, the same model as an aggregated one of that layout) and the decode model on the devices after them."""
    prefill = c.get("prefill_layout")
    if prefill is None:
        return [_model_key(spec, c)]
    return [_model_key(spec, {**c, "layout": prefill}), _model_key(spec, c) + (("after", Layout.parse(prefill).size),)]


def _place(spec: SweepSpec, c: dict, models: dict, phases) -> tuple[list, float]:
    """The models of `c` (`_model_keys`: [model], or [prefill model, decode model]), placed where not yet; returns
    (models, seconds placing them)."""
    import jax

    mode = None if c["expert_mode_requested"] == DEFAULT else c["expert_mode_requested"]
    weights = f" ({c['quantization']} weights)" if c.get("quantization") else ""
    keys = _model_keys(spec, c)
    wanted = [(keys[0], c["layout"], None)]  # (key, layout, devices: None for the first ones)
    if c.get("prefill_layout") is not None:
        n, m = Layout.parse(c["prefill_layout"]).size, Layout.parse(c["layout"]).size
        wanted = [(keys[0], c["prefill_layout"], None), (keys[1], c["layout"], jax.devices()[n:n + m])]
    for key, layout, devices in wanted:
        if key not in models:
            t = time.perf_counter()
            extra = {} if devices is None else {"devices": devices}
            with (phases.phase(f"placing {spec.model}{weights} on layout {layout}") if phases
                  else contextlib.nullcontext()):
                models[key] = (_build_model(spec, layout, mode, c.get("quantization"), **extra),
                               time.perf_counter() - t)
    return [models[k][0] for k in keys], sum(models[k][1] for k in keys)


def _run_one(spec: SweepSpec, c: dict, models: dict, hw, counter: _CompileCounter, res: SweepResult,
             failures_path: Path, log: Callable[[str], None], phases=None) -> dict | None:
    """Run configuration `c`; record a failure (and return None) if anything raises."""
    import jax

    stage = "place"
    try:
        prefill = c.get("prefill_layout")
        need = Layout.parse(c["layout"]).size + (Layout.parse(prefill).size if prefill else 0)
        if prefill and need > len(jax.devices()):
            why = f"prefill layout {prefill} + layout {c['layout']} need {need} devices, {len(jax.devices())} here"
            res.skipped.append((c, why))
            log(f"skip  {_label(c)}: {why}")
            return None
        placed, place_s = _place(spec, c, models, phases)
        model, prefill_model = placed[-1], placed[0] if prefill else None
        groups_used = c["microbatches_requested"] or model.layout.stage  # default: one microbatch group per stage
        unit = batch_shards(model) * groups_used
        if c["max_running"] % unit:
            groups = f" x {groups_used} microbatch groups" if groups_used > 1 else ""
            why = (f"max_running {c['max_running']} is not a multiple of the {batch_shards(model)} batch shards"
                   f"{groups} of {c['layout']}")
            res.skipped.append((c, why))
            log(f"skip  {_label(c)}: {why}")
            return None
        stage = "run"
        row, result = run_config(spec, model, c["chunk_size"], c["max_running"], hw, counter,
                                 c["microbatches_requested"], phases, c["enable_prefix_caching"], prefill_model)
    except Exception as err:  # noqa: BLE001 - a failed configuration is recorded and the sweep goes on
        if interrupt.requested():  # what ^C broke (e.g. inside a JAX call) is not this configuration's failure
            raise KeyboardInterrupt from err
        failure = {**c, "stage": stage, "error": f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000],
                   "traceback": traceback.format_exc(limit=6)[-4000:],
                   "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        append_row(failures_path, failure)
        res.failures.append(failure)
        log(f"FAIL  {_label(c)}: {failure['error'][:200]}")
        return None
    row.update({"expert_mode_requested": c["expert_mode_requested"], "place_s": place_s})
    res.outputs[key_of(row)] = result.outputs
    res.measured += 1
    log(f"done  {_label(c)}: {row['tokens_per_s_per_device']:.1f} tok/s/device, "
        f"{row['tokens_per_s_per_user']:.1f} tok/s/user, TTFT {row['ttft_s'] * 1e3:.1f} ms, "
        f"TPOT {row['tpot_s'] * 1e3:.2f} ms, compile {row['compile_s']:.1f} s")
    return row


def _label(c: dict) -> str:
    mode = "" if c["expert_mode_requested"] == DEFAULT else f" ep={c['expert_mode_requested']}"
    groups = "" if c.get("microbatches_requested") is None else f" microbatches {c['microbatches_requested']}"
    weights = f" {c['quantization']}" if c.get("quantization") else ""
    cache = " prefix-cache" if c.get("enable_prefix_caching") else ""
    prefill = f"prefill {c['prefill_layout']} + " if c.get("prefill_layout") else ""
    return (f"{prefill}{c['layout']}{mode}{weights}{groups} chunk {c['chunk_size']} max_running {c['max_running']}"
            f"{cache}")


class _Progress:
    """Progress over the configurations on stderr, or nothing when disabled.

    On a terminal: a rich bar (current configuration, count, elapsed, ETA) with the log lines above it. In a
    log (stderr not a terminal): plain lines, one when a configuration starts, its compile and serving phases
    (`phases`), and its result; never wrapped (a log has no width), no control codes.
    """

    def __init__(self, total: int, enabled: bool, console=None):
        self.total, self.enabled, self.console = total, enabled, console
        self._bar, self._task, self._started = None, None, 0

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            self.console = self.console or Console(stderr=True, soft_wrap=True)
        if self.enabled and self.console.is_terminal:
            from rich import progress as rp

            self._bar = rp.Progress(rp.TextColumn("[bold]sweep[/bold] {task.description}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TextColumn("ETA"),
                                    rp.TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, c: dict) -> None:
        self._started += 1
        if self._bar is not None:
            self._bar.update(self._task, description=_label(c))
        elif self.enabled:
            self.log(f"start {_label(c)} ({self._started} of {self.total})")

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def log(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line)

    def phases(self):
        """A `moejax.progress.Progress` for one configuration's phases: lines in a log; on a terminal nothing
        (the bar is the one live display there, and it shows the configuration and its elapsed time)."""
        from moejax.progress import Progress

        return Progress(enabled=self.enabled and self._bar is None, console=self.console)


def format_summary(res: SweepResult, limit: int = 60) -> str:
    """What `moejax sweep` prints: a row per configuration, token agreement, skips, failures, files, caveat."""
    head = (f"{'layout':<16} {'ep':<10} {'weights':<7} {'chunk':>5} {'maxrun':>6} {'tok/s/dev':>9} "
            f"{'tok/s/user':>10} {'TTFT ms':>8} {'TPOT ms':>8} {'compile s':>9} {'decode comm B':>13} "
            f"{'planner B':>10} {'prefill tok':>11} {'hit %':>5} {'tokens':>6}")
    lines = [head, "-" * len(head)]
    for r in res.rows[:limit]:
        hlo = r["comm"]["decode"]
        layers = sum(v for s, v in hlo["by_scope"].items() if s in LAYER_SCOPES)
        ok = {True: "same", False: "DIFF", None: "-"}[r.get("tokens_match_reference")]
        flag = " WEIGHTS MOVE" if hlo["weight_moves"] or r["comm"]["prefill"]["weight_moves"] else ""
        hit = f"{100 * r['prefix_hit_rate']:.1f}" if r.get("enable_prefix_caching") else "off"
        layout = f"{r['prefill_layout']}+{r['layout']}" if r.get("prefill_layout") else r["layout"]
        lines.append(f"{layout:<16} {r['expert_mode']:<10} {r.get('quantization') or 'float':<7} "
                     f"{r['chunk_size']:>5} {r['max_running']:>6} "
                     f"{r['tokens_per_s_per_device']:>9.1f} {r['tokens_per_s_per_user']:>10.1f} "
                     f"{r['ttft_s'] * 1e3:>8.1f} {r['tpot_s'] * 1e3:>8.2f} {r['compile_s']:>9.1f} "
                     f"{layers:>13.0f} {r['planner_comm']['decode']['layers']:>10.0f} "
                     f"{r.get('prefill_tokens', '-'):>11} {hit:>5} {ok:>6}{flag}")
    if len(res.rows) > limit:
        lines.append(f"... {len(res.rows) - limit} more in results.csv")
    split = [r for r in res.rows if r.get("prefill_layout")]
    if split:
        lines.append("")
        lines.append("disaggregated (layout P+D: prefill layout P on the first devices, decode layout D on the next): "
                     "KV bytes moved per request, measured / planner")
    for r in split[:limit]:
        measured, planner = r["kv_transfer_bytes_per_request"], r["planner_kv_transfer_bytes_per_request"]
        ratio = f" = {measured / planner:.3f}" if measured and planner else ""
        measured, planner = (f"{v:.0f}" if v is not None else "-" for v in (measured, planner))
        lines.append(f"  {r['prefill_layout']}+{r['layout']} ({r['prefill_devices']}+{r['decode_devices']} devices) "
                     f"chunk {r['chunk_size']} max_running {r['max_running']}: {measured} / {planner}{ratio} "
                     f"({r['kv_transfers']} moves)")
    digests = {r["output_digest"] for r in res.rows}
    match = [r.get("tokens_match_reference") for r in res.rows]
    lines.append("")
    if res.reference_digest is not None:
        lines.append(f"greedy tokens: {sum(m is True for m in match)} of {len(res.rows)} configurations equal the "
                     f"reference run's" + ("" if all(m is True for m in match) else " (DIFF: see tokens column)"))
    else:
        lines.append(f"greedy tokens: {len(digests)} distinct output digest(s) over {len(res.rows)} configurations")
    lines.append(f"measured now: {res.measured}, skipped: {len(res.skipped)}, failed now: {len(res.failures)}")
    for c, why in res.skipped[:8]:
        if "already" not in why:
            lines.append(f"  skipped {_label(c)}: {why}")
    for f in res.failures[:8]:
        lines.append(f"  FAILED {_label(f)}: {f['error'][:160]}")
    lines.append("decode comm B: bytes one device sends per decode step in the layers' collectives (compiled HLO); "
                 "planner B: the planner's volume for them; prefill tok: prompt tokens computed in prefill calls; "
                 "hit %: prompt tokens served from the prefix cache (off: prefix caching off)")
    for name, path in res.paths.items():
        if Path(path).exists():
            lines.append(f"{name}: {path}")
    if res.platform == "cpu":
        lines.append(f"note: {CPU_CAVEAT}.")
    lines.append(f"swept in {res.seconds:.1f} s")
    return "\n".join(lines)
