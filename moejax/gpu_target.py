"""Compile moejax's programs for a GPU on a machine without one (deviceless ahead-of-time compilation).

XLA compiles for a GPU target from a description of the device alone: with the CUDA PJRT plugin and ptxas
installed (`pip install 'moejax[gpu-compile]'`), `jax.experimental.topologies.get_topology_desc` builds
devices of a target (`configs/gpu_targets/*.txtpb`, XLA's own specs: `targets()`), a mesh over them is an
ordinary `jax.sharding.Mesh`, and `jit(f).lower(ShapeDtypeStruct(..., sharding=...)).compile()` makes the
real program (sm_90a for H100) with nothing placed anywhere. What that shows without a GPU:

- whether a program compiles for the GPU at all (a CPU kernel reached through the FFI does not: moejax picks
  its kernels from the platform of the mesh, `moejax.native.platform`);
- memory per device (`compiled.memory_analysis()`: arguments, outputs, aliased, temporaries);
- the collectives one step runs (`moejax.bench.comm`, on the optimised HLO: async and ragged forms included);
- the matmul FLOPs of the program (`dot_flops`: XLA's cost analysis is not available on this path), by
  block, so the routed experts' FLOPs can be set beside the ideal;
- the FP8 GEMMs of an FP8-quantized model (`fp8_gemms`, `dot_flops`'s "fp8"): the W8A8 path of
  `moejax.model.fp8_matmul`, as Triton GEMM fusions over f8 operands or cuBLASLt's `__cublas$lt$matmul$f8`.

Invariants: weights, KV pools and batches are `ShapeDtypeStruct`s from the model's own declarations (the
abstract `Transformer` that `moejax.weights.place` fills for a real run) and `Steps`' own specs; the programs
are those `Steps` and the engine (`moejax.engine.batch`) jit, lowered with those abstract arguments. The
process must compile for "cpu" as its own platform (`prepare`, before any backend starts): otherwise the
plugin tries to start a GPU that is not there and the topology cannot be made.

Counting conventions: per device and per step. A `while` of known trip count (the layer scan) counts that
many times, one of unknown count (the "loop" strategy's experts-with-tokens loop) once, and a `conditional`
its heaviest branch (a static worst case: the exchange's largest capacity, the largest row bucket).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from moejax.model import grouped_matmul

SPEC_DIR = Path(__file__).parent / "configs" / "gpu_targets"
PHASES = ("prefill", "decode", "engine")
# Sorts of >= 32,768 elements use CUB's radix sort, whose scratch size XLA asks of a live device; with no device
# it cannot compile them. XLA's own sort is used instead: compile-time only, a real GPU run keeps CUB's.
COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}
_GEMM_CALLS = ("__cublas$gemm", "__cublas$lt$matmul")  # the second also matches "__cublas$lt$matmul$f8"
FP8_GEMM_CALL = "__cublas$lt$matmul$f8"  # cuBLASLt's FP8 GEMM (XLA's name for it; with Triton GEMMs off)
EXPERTS_SCOPE = "moe/experts"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def targets() -> dict[str, Path]:
    """Target name (e.g. "h100-sxm", the planner's hardware name) -> its GpuTargetConfigProto text file."""
    return {p.stem.replace("_", "-"): p for p in sorted(SPEC_DIR.glob("*.txtpb"))}


def unavailable_reason() -> str | None:
    """Why this machine cannot compile for a GPU target (None when it can): the plugin or ptxas missing."""
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return "the CUDA PJRT plugin (jax-cuda12-plugin) is not installed: pip install 'moejax[gpu-compile]'"
    nvcc = importlib.util.find_spec("nvidia.cuda_nvcc") if importlib.util.find_spec("nvidia") else None
    roots = list(nvcc.submodule_search_locations or []) if nvcc else []
    if not any((Path(r) / "bin" / "ptxas").exists() for r in roots):
        return "ptxas (nvidia-cuda-nvcc-cu12) is not installed: pip install 'moejax[gpu-compile]'"
    return None


def prepare() -> None:
    """Make this process one that compiles for GPU targets: its own platform "cpu". Call before anything
    starts a JAX backend; later it only checks (RuntimeError naming the fix when it cannot hold)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
    elif jax.config.jax_platforms != "cpu":
        raise RuntimeError(f"JAX's backends started with platforms {jax.config.jax_platforms!r}; compiling for a "
                           f"GPU target needs 'cpu': set JAX_PLATFORMS=cpu, or call moejax.gpu_target.prepare() "
                           f"before anything uses JAX")


def spec_text(target: str) -> str:
    """The target's GpuTargetConfigProto text; ValueError naming the known targets."""
    known = targets()
    if target not in known:
        raise ValueError(f"unknown GPU target {target!r}; known: {sorted(known)} (files in {SPEC_DIR})")
    return known[target].read_text()


@functools.cache
def _topology(target: str, num_devices: int):
    hosts, per_host = (1, num_devices) if num_devices <= 8 else (num_devices // 8, 8)
    if hosts * per_host != num_devices:
        raise ValueError(f"{num_devices} GPUs are not whole hosts of 8; use at most 8 or a multiple of 8")
    from jax.experimental import topologies

    prepare()
    return topologies.get_topology_desc(platform="cuda", target_config=spec_text(target),
                                        topology=f"1x{hosts}x{per_host}")


def target_mesh(target: str, layout) -> jax.sharding.Mesh:
    """The runtime's mesh (`moejax.mesh.make_mesh`) for `layout` over devices of `target` (none of them real)."""
    from moejax.mesh import Layout, make_mesh

    layout = Layout.parse(layout)
    return make_mesh(layout, _topology(target, layout.size).devices)


# ---- the programs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """What the compiled programs serve (the planner's terms, so its figures are for the same thing).

    Attributes:
      batch: concurrent requests per model replica (`data` group); decode rows per batch shard are
        ceil(batch / batch shards per replica).
      context: longest sequence (prompt + output tokens): the page table's width; the KV pools hold
        `batch` such sequences per replica.
      chunk: prefill tokens per step per batch shard (one row of `chunk` tokens).
      page_size: tokens per KV page.
    """

    batch: int = 64
    context: int = 2048
    chunk: int = 512
    page_size: int = 16

    def __post_init__(self):
        for name in ("batch", "context", "chunk", "page_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Shapes.{name} must be an integer >= 1, got {value!r}")


def abstract_steps(cfg, layout, mesh, dtype="bfloat16", moe_strategy: str = "auto",
                   expert_mode: str = "dp_attention", exchange: str = "auto", quantization: str | None = None):
    """`moejax.steps.Steps` for `cfg` on `mesh` with abstract weights (nothing placed) and their shardings.

    The weights are the model's own declarations (`moejax.weights.abstract_model`, what `place` fills for a real
    run; `quantization`: a post-training weight quantization, `moejax.quant`); returns (steps, params) with params
    the `Steps.params` tree as ShapeDtypeStructs in `Steps.param_specs`.
    """
    from moejax import steps as steps_lib
    from moejax.sharding import Parallelism, expert_mode_of
    from moejax.weights import abstract_model

    par = Parallelism(layout, expert_mode_of(expert_mode), moe_strategy, exchange)
    with jax.set_mesh(mesh):
        module = abstract_model(cfg, par, DTYPES[dtype], quantization)
    steps = steps_lib.Steps(module, mesh)
    abstract = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, spec))  # noqa: E731
    params = jax.tree.map(abstract, steps.params, steps.param_specs)
    return steps, params


def _sds(steps, shape, dtype, axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=steps.named(axes))


def program(steps, params, shapes: Shapes, phase: str):
    """(the jitted function, its abstract arguments, tokens per batch shard) of one phase:

    "prefill": `Steps.step` on one `chunk`-token row per batch shard; "decode": `Steps.step` on the decode
    rows, one token each; "engine": the engine's decode call (`moejax.engine.batch`: the step and the sampler,
    or with pipeline stages one pipelined tick, every stage holding a microbatch).
    """
    from moejax import steps as steps_lib
    from moejax.engine import batch as batch_lib
    from moejax.kv_cache import pages_for

    shards = steps.batch_shards
    per_replica = shards // steps.mesh.shape["data"]
    rows = -(-shapes.batch // per_replica)
    pages = pages_for(shapes.context, shapes.page_size)
    dtype = params["embed"].dtype
    cache = tuple(_sds(steps, shape, dtype, axes) for shape, axes in
                  zip(steps.cache_shapes(shards * rows * pages, shapes.page_size), steps.cache_axes, strict=True))
    i32 = functools.partial(_sds, steps, dtype=jnp.int32)
    if phase in ("prefill", "decode"):
        B, T = (shards, shapes.chunk) if phase == "prefill" else (shards * rows, 1)
        args = (params, cache, i32((B, T), axes=steps_lib.BATCH), i32((B, T), axes=steps_lib.BATCH),
                i32((B, pages), axes=steps_lib.BATCH), i32((B,), axes=steps_lib.TOKENS))
        return steps.step, args, (B // shards) * T
    if phase != "engine":
        raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    width = batch_lib.packed_width(1, pages)
    S = steps.num_stages
    if S == 1:
        packed = i32((shards * rows, width), axes=steps_lib.BATCH)
        return batch_lib.sampled_step(steps), (params, cache, packed, 1), rows
    micro = -(-rows // S)  # the default microbatches: one per stage
    x = _sds(steps, (S, shards * micro, 1, steps.cfg.hidden_size), dtype, steps_lib.ACTIVATIONS)
    args = (params, cache, x, i32((S, shards * micro, width), axes=steps_lib.STAGED), i32((S,), axes=("layers",)), 1)
    return batch_lib.pipelined_step(steps), args, micro


# ---- reading a compiled program -------------------------------------------------------------------------


def custom_calls(text: str) -> list[str]:
    """The custom-call targets of an HLO module (e.g. "__cublas$gemm"; a CPU FFI kernel such as
    "moejax_argmax" would mean a program that cannot run on the GPU)."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


def _grouped_kernel(attrs: str) -> bool:
    return "xla.gpu.triton" in attrs and any(f"/{k}/" in attrs for k in grouped_matmul.KERNELS)


def dot_flops(text: str) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one execution of a compiled module, per device.

    Counts `dot`s (in any computation: fusions, loop bodies), cuBLAS GEMM custom calls and the Pallas grouped-GEMM
    kernels of the "pallas" MoE strategy (Triton custom calls: every block of their static grid, the bound the
    kernels skip unused blocks under), with the module docstring's loop and conditional conventions. Returns
    {"total", "experts" (under the `moe/experts` scope: the routed experts), "fp8" (FP8 GEMMs: `fp8_gemms`),
    "unknown_loops" (loops of unknown trip count holding dots, counted once)}.
    """
    from moejax.bench.comm import _arrays, branches, callees, loop_body, parse_module

    comps, entry, _ = parse_module(text)
    types = {c: {i.name: i.type for i in ins} for c, ins in comps.items()}
    memo: dict[str, Counter] = {}

    def flops(comp, ins) -> float:
        operands = re.findall(r"%([\w.\-]+)", ins.attrs.split(")", 1)[0])
        if ins.opcode == "dot":
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            contracting = [int(d) for d in dims.group(1).split(",") if d] if dims else []
        else:
            dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
            contracting = [int(d) for d in re.findall(r"\d+", dims.group(1))] if dims else []
        if ins.opcode == "custom-call" and _grouped_kernel(ins.attrs):
            x = _arrays(types[comp].get(operands[2], "")) if len(operands) > 2 else []  # (layer, blocks, x, w...)
            out = _arrays(ins.type)
            return grouped_matmul.call_flops(x[0][1], out[0][1], len(operands) - 3) if x and out else 0.0
        lhs = _arrays(types[comp].get(operands[0], "")) if operands else []
        out = _arrays(ins.type)
        if not lhs or not out:
            return 0.0
        return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][d] for d in contracting)

    def visit(name: str, scope_experts: bool) -> Counter:
        key = f"{name}:{scope_experts}"
        if key in memo:
            return memo[key]
        memo[key] = Counter()
        total: Counter = Counter()
        for ins in comps.get(name, []):
            experts = scope_experts or EXPERTS_SCOPE in ins.attrs
            if ins.opcode == "dot" or (ins.opcode == "custom-call" and (any(g in ins.attrs for g in _GEMM_CALLS)
                                                                     or _grouped_kernel(ins.attrs))):
                f = flops(name, ins)
                total["total"] += f
                total["experts"] += f if experts else 0.0
                total["fp8"] += f if _fp8_gemm(types[name], ins) else 0.0
            elif ins.opcode == "while":
                body, trip = loop_body(ins.attrs)
                inner = visit(body, experts) if body else Counter()
                count = 1 if trip is None else trip
                total.update({k: v * count for k, v in inner.items() if k != "unknown_loops"})
                total["unknown_loops"] += inner["unknown_loops"] + (trip is None and inner["total"] > 0)
            elif ins.opcode == "conditional":
                costs = [visit(b, experts) for b in branches(ins.attrs)]
                if costs:
                    total.update(max(costs, key=lambda c: c["total"]))
            else:
                for callee in callees(ins.attrs):
                    total.update(visit(callee, experts))
        memo[key] = total
        return total

    result = visit(entry, False)
    return {"total": result["total"], "experts": result["experts"], "fp8": result["fp8"],
            "unknown_loops": int(result["unknown_loops"])}


def _fp8_gemm(types: dict, ins) -> bool:
    """Whether an instruction is an FP8 GEMM: cuBLASLt's FP8 call, or a `dot` of two float8 operands (the form of
    a Triton GEMM fusion's dot, and of a dot XLA has not rewritten yet)."""
    if ins.opcode == "custom-call":
        return f'custom_call_target="{FP8_GEMM_CALL}"' in ins.attrs
    if ins.opcode != "dot":
        return False
    operands = re.findall(r"%([\w.\-]+)", ins.attrs.split(")", 1)[0])[:2]
    return len(operands) == 2 and all(types.get(o, "").startswith("f8") for o in operands)


def fp8_gemms(text: str) -> dict[str, int]:
    """The FP8 GEMMs of a compiled module, each instruction once (not per execution): op name -> count, the op
    named as the HLO writes it: "__cublas$lt$matmul$f8" (a cuBLASLt custom call) or "dot(f8e4m3fn, f8e4m3fn)"
    (operand types; inside a Triton GEMM fusion, the form a deviceless H100 compile picks)."""
    from moejax.bench.comm import _arrays, parse_module

    comps, _, _ = parse_module(text)
    found: Counter = Counter()
    for comp in comps.values():
        types = {i.name: i.type for i in comp}
        for ins in comp:
            if not _fp8_gemm(types, ins):
                continue
            if ins.opcode == "custom-call":
                found[FP8_GEMM_CALL] += 1
            else:
                operands = re.findall(r"%([\w.\-]+)", ins.attrs.split(")", 1)[0])[:2]
                found[f"dot({', '.join(_arrays(types[o])[0][0] for o in operands)})"] += 1
    return dict(sorted(found.items()))


# ---- one (model, layout) on a target --------------------------------------------------------------------


@dataclass
class Result:
    """One compiled program (bytes and FLOPs per device, per step). `error` is set when it did not compile."""

    model: str
    layout: str
    phase: str
    target: str
    expert_mode: str
    exchange: str
    moe_strategy: str
    ok: bool
    error: str | None = None
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    collectives: dict = field(default_factory=dict)  # kind -> executions per step (async forms folded in)
    collective_bytes: float = 0.0  # wire bytes one device sends per step (ragged: its buffer, an upper bound)
    custom_calls: list = field(default_factory=list)
    flops: float = 0.0
    expert_flops: float = 0.0
    fp8_flops: float = 0.0  # of `flops`, those of FP8 GEMMs
    fp8_gemms: dict = field(default_factory=dict)  # op name -> FP8 GEMM instructions in the program (`fp8_gemms`)
    quantization: str | None = None  # the weights' post-training quantization (`moejax.quant`), None: float
    unknown_loops: int = 0
    tokens: int = 0  # tokens per batch shard
    compile_s: float = 0.0
    hlo_instructions: int = 0  # the compiled program's size (independent of the layer and expert counts)
    planner: dict = field(default_factory=dict)  # the planner's figures for the same shapes

    @property
    def total_bytes(self) -> int:
        """Device memory the program needs: arguments + outputs - aliased (donated) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}


def hlo_instructions(text: str) -> int:
    """Instructions in an HLO module's text (lines of the form `%name = type op(...)`)."""
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, flags=re.MULTILINE))


def compile_layout(cfg, layout, target: str = "h100-sxm", shapes: Shapes | None = None, phases=PHASES,
                   dtype: str = "bfloat16", moe_strategy: str = "auto", expert_mode: str = "dp_attention",
                   exchange: str = "auto", quantization: str | None = None) -> list[Result]:
    """Compile each phase of `cfg` on `layout` for `target`; one `Result` per phase (a failure is a Result with
    `ok` False and XLA's message, not an exception). Bad names or shapes raise ValueError first.
    `quantization`: the weights' post-training quantization ("fp8" runs W8A8 on FP8 GEMMs where
    `fp8_matmul.PLATFORMS` opts in)."""
    from moejax.bench import comm
    from moejax.mesh import Layout

    shapes = shapes or Shapes()
    layout = Layout.parse(layout).validate(cfg)
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise ValueError(f"phases must be some of {PHASES}, got {list(phases)}")
    mesh = target_mesh(target, layout)
    steps, params = abstract_steps(cfg, layout, mesh, dtype, moe_strategy, expert_mode, exchange, quantization)
    weights = comm.weight_shapes(type("Abstract", (), {"params": params}))
    out = []
    for phase in phases:
        res = Result(cfg.name, str(layout), phase, target, expert_mode, exchange, moe_strategy, ok=False,
                     quantization=quantization)
        fn, args, res.tokens = program(steps, params, shapes, phase)
        t0 = time.perf_counter()
        try:
            with jax.set_mesh(mesh):
                compiled = fn.lower(*args).compile(compiler_options=COMPILER_OPTIONS)
        except Exception as err:  # XLA's errors are of several types; the message is the result
            res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"
            out.append(res)
            continue
        res.compile_s = round(time.perf_counter() - t0, 2)
        text = compiled.as_text()
        res.hlo_instructions = hlo_instructions(text)
        mem = compiled.memory_analysis()
        res.argument_bytes, res.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
        res.alias_bytes, res.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
        summary = comm.summarize(comm.collectives(text, weights))
        res.collectives = {k: v["count"] for k, v in summary["by_kind"].items() if v["count"]}
        res.collective_bytes = summary["wire_bytes"]
        res.custom_calls = custom_calls(text)
        counted = dot_flops(text)
        res.flops, res.expert_flops, res.unknown_loops = counted["total"], counted["experts"], counted["unknown_loops"]
        res.fp8_flops, res.fp8_gemms = counted["fp8"], fp8_gemms(text)
        res.planner = planner_figures(cfg, layout, target, shapes, phase, res.tokens, expert_mode, steps, quantization)
        res.ok = True
        out.append(res)
    return out


def planner_figures(cfg, layout, target: str, shapes: Shapes, phase: str, tokens: int, expert_mode: str,
                    steps, quantization: str | None = None) -> dict:
    """The planner's figures for the same program: memory per device (weights + KV + workspace), the collective
    bytes one device sends (`moejax.bench.comm.planner_volume`), and the ideal routed-expert FLOPs per device
    (a replica's routed tokens x 2 x D x F x 3 over the MoE's devices of a group, MoE TP x EP, on the heaviest
    stage; a split layout's MoE TP is its MTP factor, not attention's TP)."""
    from moejax.bench.comm import planner_volume
    from moejax.planner.hardware import load_hardware
    from moejax.planner.memory import memory_fit, stages
    from moejax.planner.workload import Options, Workload

    hw = load_hardware(target)
    act = 2.0 if steps.params["embed"].dtype != jnp.float32 else 4.0
    precision = {2.0: "bf16", 4.0: "fp32"}[act]
    workload = Workload(isl=max(1, shapes.context // 2), osl=shapes.context - max(1, shapes.context // 2),
                        precision=quantization or precision, kv_precision=precision, act_bytes=act)
    fit = memory_fit(cfg, layout, hw, workload, Options(expert_mode=expert_mode), shapes.batch, shapes.chunk)
    pipelined = phase == "engine" and layout.stage > 1
    volume = planner_volume(cfg, layout, expert_mode, tokens, act, hw, pipelined=pipelined)
    replica_tokens = tokens * steps.batch_shards // layout.data
    moe_layers = max(s.moe_layers for s in stages(cfg, layout))
    expert = replica_tokens * cfg.num_experts_per_tok * 6.0 * cfg.hidden_size * cfg.moe_intermediate_size
    return {"memory_bytes": fit.weights + fit.kv_cache + fit.workspace, "weights_bytes": fit.weights,
            "kv_bytes": fit.kv_cache, "workspace_bytes": fit.workspace, "device_bytes": hw.memory_bytes,
            "collective_bytes": volume["total"],
            "expert_flops": expert * moe_layers / layout.group}


def cpu_kernels(result: Result) -> list[str]:
    """The CPU FFI kernels (moejax.native) among a compiled program's custom calls: must be none on a GPU."""
    from moejax import native

    return [c for c in result.custom_calls if c in native.FFI_TARGETS]
