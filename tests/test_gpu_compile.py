"""Compiling for a GPU without one: the backend decision from the mesh (CPU tests, no CUDA packages needed),
reading compiled programs (synthetic HLO), and real H100 programs (marker `gpu_compile`, its own CI step;
skipped with the reason when the `gpu-compile` extra is not installed)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import moejax
from moejax import gpu_target, native
from moejax.model import moe
from moejax.model.layers import argmax_and_finite, project
from moejax.planner.hardware import load_hardware


def _mesh(platform: str) -> AbstractMesh:
    """A one-device mesh whose device reports `platform`, as topology devices of a GPU target do."""
    device = AbstractDevice(device_kind=f"fake {platform}", num_cores=None, platform=platform)
    return AbstractMesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), abstract_device=device)


def _kernels_traced(fn, *args, platform: str) -> bool:
    """Whether tracing `fn` for a mesh of `platform` reaches a custom call (moejax's CPU kernels are FFI calls)."""
    with jax.sharding.use_abstract_mesh(_mesh(platform)):
        return "ffi_call" in str(jax.make_jaxpr(fn)(*args))


def _moe_args(M=6, D=16, F=8, El=4, X=2):
    rng = np.random.default_rng(0)
    w = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, El, D, F), (1, El, D, F), (1, El, F, D)))
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    return x, jnp.full((M, X), 0.5, jnp.float32), jnp.asarray(rng.integers(0, El, (M, X)), jnp.int32), w


def test_platform_is_the_mesh_s():
    assert native.platform() == jax.default_backend() == "cpu"  # no mesh: this process's backend
    for platform in ("gpu", "cpu"):
        with jax.sharding.use_abstract_mesh(_mesh(platform)):
            assert native.platform() == platform
        # Inside a jit with no mesh in the context: the operand's sharding knows the mesh.
        operand = jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=NamedSharding(_mesh(platform), P()))
        seen = []

        def record(a, seen=seen):
            seen.append(native.platform(a))
            return a

        jax.make_jaxpr(record)(operand)
        assert seen == [platform]
    # A mesh that does not know its devices is passed over.
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("data",))):
        assert native.platform() == "cpu"


@pytest.mark.parametrize("which", ["matmul", "argmax", "moe"])
def test_no_cpu_kernel_in_a_program_for_a_gpu_mesh(which):
    """Every place a native kernel can be chosen (float32, kernels built) picks XLA's path for a GPU mesh;
    the same trace for a CPU mesh does take the kernel (so the check can fail)."""
    x, gate, local, w = _moe_args()
    fn, args = {"matmul": (lambda a, b: project(a, b, 0), (x, w[0][:, 0])),
                "argmax": (argmax_and_finite, (x,)),
                "moe": (lambda *a: moe.local_dispatch(*a, 0, "auto"), (x, gate, local, w))}[which]
    assert not _kernels_traced(fn, *args, platform="gpu")
    if native.available():
        assert _kernels_traced(fn, *args, platform="cpu")


def test_strategy_and_exchange_choices_take_the_platform():
    assert moe.choose_strategy("auto", 8, "gpu", native_ok=True) == "loop"
    assert moe.choose_strategy("auto", 8, "cpu", native_ok=True) == "native"
    assert moe.choose_exchange("auto", "gpu") == "all_to_all"
    x, gate, local, w = _moe_args()
    with jax.sharding.use_abstract_mesh(_mesh("gpu")):
        assert moe._strategy_fn("auto", x, w) is moe._STRATEGY_FNS["loop"]


# ---- reading compiled programs (synthetic HLO in the form XLA prints for a GPU) ---------------------------

_EXPERT = 'metadata={op_name="jit(f)/shard_map/moe/experts/dot_general"}'
_GEMM = ('custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
         '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}')
HLO = f"""HloModule jit_f, is_scheduled=true, num_partitions=1

%fused_dot (p0: bf16[8,64], p1: bf16[64,32]) -> bf16[8,32] {{
  %p0 = bf16[8,64]{{1,0}} parameter(0)
  %p1 = bf16[64,32]{{1,0}} parameter(1)
  ROOT %d = bf16[8,32]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}, {_EXPERT}
}}

%body (p: (s32[], bf16[8,64], bf16[64,32], bf16[64,16])) -> (s32[], bf16[8,64], bf16[64,32], bf16[64,16]) {{
  %p = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) parameter(0)
  %x = bf16[8,64]{{1,0}} get-tuple-element(%p), index=1
  %w = bf16[64,32]{{1,0}} get-tuple-element(%p), index=2
  %w2 = bf16[64,16]{{1,0}} get-tuple-element(%p), index=3
  %f = bf16[8,32]{{1,0}} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %g = (bf16[8,16]{{1,0}}, s8[1024]{{0}}) custom-call(%x, %w2), {_GEMM}
  ROOT %r = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) tuple(%p)
}}

%cond (p: (s32[], bf16[8,64], bf16[64,32], bf16[64,16])) -> pred[] {{
  %p = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) parameter(0)
  ROOT %k = pred[] constant(false)
}}

%none (p: bf16[8,64]) -> bf16[8,64] {{
  ROOT %p = bf16[8,64]{{1,0}} parameter(0)
}}

%one (p: bf16[8,64], q: bf16[64,32]) -> bf16[8,32] {{
  %p = bf16[8,64]{{1,0}} parameter(0)
  %q = bf16[64,32]{{1,0}} parameter(1)
  ROOT %d = bf16[8,32]{{1,0}} dot(%p, %q), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

ENTRY %main (t: (s32[], bf16[8,64], bf16[64,32], bf16[64,16]), i: s32[]) -> bf16[8,32] {{
  %t = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) parameter(0)
  %i = s32[] parameter(1)
  %w4 = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) while(%t), condition=%cond, body=%body, \
backend_config={{"known_trip_count":{{"n":"4"}}}}
  %wu = (s32[], bf16[8,64]{{1,0}}, bf16[64,32]{{1,0}}, bf16[64,16]{{1,0}}) while(%t), condition=%cond, body=%body
  ROOT %c = bf16[8,32]{{1,0}} conditional(%i, %t, %t), branch_computations={{%none, %one}}
}}
""".replace("\\\n", "")


def test_dot_flops_counts_loops_branches_fusions_and_gemm_calls():
    one_dot, gemm = 2 * 8 * 32 * 64, 2 * 8 * 16 * 64
    got = gpu_target.dot_flops(HLO)
    # 4 trips of (fused expert dot + cuBLAS gemm), the unknown-count loop once, the heavier branch.
    assert got["total"] == 4 * (one_dot + gemm) + (one_dot + gemm) + one_dot
    assert got["experts"] == 5 * one_dot  # only the dot under moe/experts
    assert got["unknown_loops"] == 1
    assert gpu_target.custom_calls(HLO) == ["__cublas$gemm"]


_FP8_HLO = """HloModule jit_f, is_scheduled=true, num_partitions=1

%gemm_fusion (p0: f8e4m3fn[16,64], p1: f8e4m3fn[64,32]) -> f32[16,32] {
  %p0 = f8e4m3fn[16,64]{1,0} parameter(0)
  %p1 = f8e4m3fn[64,32]{1,0} parameter(1)
  ROOT %d = f32[16,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f8e4m3fn[16,64], b: f8e4m3fn[64,32], c: bf16[16,64], e: bf16[64,32], s: f32[]) -> f32[16,32] {
  %a = f8e4m3fn[16,64]{1,0} parameter(0)
  %b = f8e4m3fn[64,32]{1,0} parameter(1)
  %c = bf16[16,64]{1,0} parameter(2)
  %e = bf16[64,32]{1,0} parameter(3)
  %s = f32[] parameter(4)
  %f = f32[16,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion
  %g = (f32[16,32]{1,0}, s8[1024]{0}) custom-call(%a, %b, %s, %s), custom_call_target="__cublas$lt$matmul$f8", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"]}}}
  ROOT %h = f32[16,32]{1,0} dot(%c, %e), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
""".replace("\\\n", "")


def test_fp8_gemms_are_cublaslt_f8_calls_and_dots_of_two_f8_operands():
    assert gpu_target.fp8_gemms(_FP8_HLO) == {"__cublas$lt$matmul$f8": 1, "dot(f8e4m3fn, f8e4m3fn)": 1}
    flops = gpu_target.dot_flops(_FP8_HLO)
    one = 2 * 16 * 32 * 64
    assert flops["total"] == 3 * one and flops["fp8"] == 2 * one  # the bf16 dot is not FP8
    assert gpu_target.fp8_gemms(HLO) == {} and gpu_target.dot_flops(HLO)["fp8"] == 0


def test_targets_are_xla_specs_with_their_licence():
    known = gpu_target.targets()
    assert {"h100-sxm", "h200", "b200"} <= set(known)
    for name, path in known.items():
        text = path.read_text()
        assert "Licensed under the Apache License, Version 2.0" in text and "Modified by moejax" in text
        assert "collective_memory_granularity" not in text.replace("`collective_memory_granularity`", ""), name
        assert 'platform_name: "CUDA"' in text
        assert load_hardware(name).name == name  # the planner's file of the same name
    with pytest.raises(ValueError, match="unknown GPU target 'a100'"):
        gpu_target.spec_text("a100")


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="Shapes.batch must be an integer >= 1, got 0"):
        gpu_target.Shapes(batch=0)


def test_cli_refuses_bad_targets_in_one_line(capsys):
    from moejax.args import run_main
    from moejax.bench import compile as bench_compile

    assert run_main(lambda argv: bench_compile.main(argv, prog="moejax bench compile"),
                    ["--target", "a100", "--model", "qwen3-30b-a3b"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "moejax: error: --target: unknown GPU target 'a100'; known: ['b200', 'h100-sxm', 'h200'] (see 'moejax bench "
        "compile --help')"]


# ---- real programs for H100 (the `gpu-compile` extra) -----------------------------------------------------

REASON = gpu_target.unavailable_reason()
needs_plugin = pytest.mark.skipif(REASON is not None, reason=f"no GPU compilation here: {REASON}")
H100_BYTES = 80e9  # the planner's h100-sxm memory_bytes


def _expected_kinds(layout: str, mode: str, exchange: str, phase: str) -> set[str]:
    """The collective kinds each program must run, and no other (an all-gather of weights would show here)."""
    lay = moejax.Layout.parse(layout)
    kinds = set()
    if lay.expert > 1 and mode == "dp_attention":
        if exchange == "ragged_all_to_all":
            kinds |= {"ragged-all-to-all", "all-gather"}  # the units, and the counts every device needs
        else:
            kinds |= {"all-to-all", "all-reduce"}  # the rows, and the capacity (a max over the expert group)
    if lay.tensor > 1 or (lay.expert > 1 and mode == "replicated_attention"):
        kinds.add("all-reduce")  # tensor-parallel partial sums; the replicated mode's expert combine
    if phase == "engine" and lay.expert > 1 and mode == "dp_attention":
        kinds.add("all-reduce")  # the sampler over rows split over the expert axis too
    if lay.tensor > 1 or (lay.stage > 1 and phase == "engine"):
        kinds.add("all-gather")  # once per step: the vocabulary-split logits; the leaving microbatch's rows
    if lay.stage > 1:
        kinds.add("collective-permute")  # activations to the next stage
    return kinds


CI_SET = [("DP1", "dp_attention", "auto")] + [(layout, mode, "auto")
                                              for mode in ("dp_attention", "replicated_attention")
                                              for layout in ("EP8", "TP4EP2", "DP2TP2EP2", "PP2EP4")]
CI_SET += [("EP8", "dp_attention", "ragged_all_to_all")]


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.parametrize(("layout", "mode", "exchange"), CI_SET)
def test_qwen3_30b_compiles_for_h100(layout, mode, exchange):
    cfg = moejax.load_model_config("qwen3-30b-a3b")
    results = gpu_target.compile_layout(cfg, layout, "h100-sxm", gpu_target.Shapes(), ("prefill", "engine"),
                                        expert_mode=mode, exchange=exchange)
    for res in results:
        assert res.ok, f"{res.phase}: {res.error}"
        assert gpu_target.cpu_kernels(res) == [], res.custom_calls
        assert res.total_bytes <= H100_BYTES, (res.phase, res.total_bytes)
        assert set(res.collectives) == _expected_kinds(layout, mode, exchange, res.phase), (res.phase, res.collectives)
        assert "__gpu$xla.gpu.triton" in res.custom_calls  # the Pallas kernels: paged attention, grouped GEMM


def _expected_split_kinds(layout: str, phase: str) -> set[str]:
    """The collective kinds a split layout's program must run, and no other, from the axes `Parallelism` picks for
    the MoE (gather, exchange, closing reduce) and attention (heads and vocabulary over attention's tensor axes)."""
    from moejax.sharding import Parallelism

    lay = moejax.Layout.parse(layout)
    par = Parallelism(lay, "dp_attention")
    kinds = set()
    if par.exchange_axes:
        kinds |= {"all-to-all", "all-reduce"}  # the rows, and the capacity (a max over the expert group)
    if par.gather_axes:
        kinds |= {"all-gather", "reduce-scatter"}  # tokens over the MoE's tensor group, their outputs back
    if par.reduce_axes or par.mesh_axes("heads"):
        kinds.add("all-reduce")  # the MoE's closing sum; attention's tensor-parallel partial sums
    if phase == "engine" and par.batch_shards > lay.data:
        kinds.add("all-reduce")  # the sampler over rows split inside the group
    if par.mesh_axes("vocab") or (lay.stage > 1 and phase == "engine"):
        kinds.add("all-gather")  # the vocabulary-split logits; the leaving microbatch's rows
    if lay.stage > 1:
        kinds.add("collective-permute")
    return kinds


# Attention TP becoming expert parallelism (tokens sliced and exchanged); requests split over the MoE's tensor group
# (tokens gathered, then exchanged); pipeline stages with attention TP over the MoE's experts.
SPLIT_SET = ["TP4MTP1EP8", "TP2MTP4EP2", "TP2MTP1EP2PP2"]


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.parametrize("layout", SPLIT_SET)
def test_qwen3_30b_compiles_for_h100_on_a_split_layout(layout):
    """Split layouts (the MoE split apart from attention over the same devices) compile for H100 at qwen3-30b-a3b's
    real sizes: no CPU kernel, within the device's memory, the collectives the split implies and no other, the
    planner's figures for the same program."""
    cfg = moejax.load_model_config("qwen3-30b-a3b")
    results = gpu_target.compile_layout(cfg, layout, "h100-sxm", gpu_target.Shapes(), ("prefill", "engine"))
    for res in results:
        assert res.ok, f"{res.phase}: {res.error}"
        assert res.layout == layout and gpu_target.cpu_kernels(res) == [], res.custom_calls
        assert res.total_bytes <= H100_BYTES, (res.phase, res.total_bytes)
        assert set(res.collectives) == _expected_split_kinds(layout, res.phase), (res.phase, res.collectives)
        assert "__gpu$xla.gpu.triton" in res.custom_calls
        assert res.planner["collective_bytes"] > 0 and res.planner["memory_bytes"] > 0


@pytest.mark.gpu_compile
@needs_plugin
def test_a_split_layout_s_ideal_expert_flops_are_over_its_moe_devices():
    """The planner's ideal routed-expert FLOPs spread a replica's tokens over the MoE's devices, MTP x EP (not
    attention's TP x EP): TP4MTP1EP8's compiled prefill (Pallas kernels over the all-to-all's fixed capacity) is the
    same multiple of its ideal as EP8's, whose MoE is split the same way over 8 devices."""
    cfg = moejax.load_model_config("qwen3-30b-a3b")
    ratio = {}
    for layout in ("EP8", "TP4MTP1EP8"):
        (res,) = gpu_target.compile_layout(cfg, layout, "h100-sxm", gpu_target.Shapes(chunk=2048), ("prefill",),
                                           moe_strategy="pallas")
        assert res.ok, res.error
        ratio[layout] = res.expert_flops / res.planner["expert_flops"]
    assert ratio["TP4MTP1EP8"] == pytest.approx(ratio["EP8"], rel=0.1), ratio


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.parametrize(("model", "layout", "mode"), [
    ("deepseek-count-tiny", "DP2TP2EP2", "dp_attention"),  # MLA (latent pool), grouped routing, dense + MoE stacks
    ("deepseek-count-tiny", "TP2EP2PP2", "replicated_attention"),
    ("gpt-oss-20b", "EP8", "dp_attention"),  # sinks, sliding layers, biased clamped experts (the "loop" strategy)
], ids=["deepseek-dp", "deepseek-pp-replicated", "gpt-oss-ep8"])
def test_new_families_compile_for_h100(model, layout, mode):
    """The new attention kinds and experts compile for a GPU with no CPU kernel (MLA and sinks run XLA's paged
    attention there; gpt-oss's experts the loop strategy)."""
    cfg = moejax.load_model_config(model)
    small = gpu_target.Shapes(batch=8, context=256, chunk=64)
    for res in gpu_target.compile_layout(cfg, layout, "h100-sxm", small, ("prefill", "engine"), expert_mode=mode):
        assert res.ok, f"{res.phase}: {res.error}"
        assert gpu_target.cpu_kernels(res) == [], res.custom_calls
        assert res.total_bytes <= H100_BYTES, (res.phase, res.total_bytes)


@pytest.mark.gpu_compile
@needs_plugin
def test_a_float32_program_compiles_for_gpu_only_with_the_mesh_s_platform(monkeypatch):
    """float32 is where the CPU kernels are chosen: with the choice made from the mesh the GPU program has none;
    made from this (CPU) process instead, as before, XLA refuses the program for CUDA."""
    cfg = moejax.load_model_config("qwen3-30b-a3b-tiny")
    small = gpu_target.Shapes(batch=4, context=64, chunk=16)
    (res,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", small, ("engine",), dtype="float32")
    assert res.ok and gpu_target.cpu_kernels(res) == [], (res.error, res.custom_calls)
    if native.available():
        monkeypatch.setattr(native, "platform", lambda *arrays: "cpu")
        (res,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", small, ("engine",), dtype="float32")
        assert not res.ok and "moejax_" in res.error


@pytest.mark.gpu_compile
@needs_plugin
def test_the_grouped_gemm_s_expert_flops_are_within_1_3x_of_the_routed_ones():
    """Prefill of 2048 tokens per step on one H100 (qwen3-30b-a3b, 256 pairs per expert): the compiled program's
    routed-expert FLOPs, the Pallas kernels' whole static grid, against routed tokens x 2 x D x F x 3; "ragged"
    (XLA's ragged_dot: a dense dot over every expert) for contrast."""
    cfg = moejax.load_model_config("qwen3-30b-a3b")
    shapes = gpu_target.Shapes(chunk=2048)
    (pallas,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", shapes, ("prefill",), moe_strategy="pallas")
    ideal = pallas.planner["expert_flops"]
    assert pallas.ok and ideal <= pallas.expert_flops <= 1.3 * ideal, (pallas.expert_flops, ideal)
    (ragged,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", shapes, ("prefill",), moe_strategy="ragged")
    assert ragged.expert_flops > 50 * ideal


@pytest.mark.gpu_compile
@needs_plugin
def test_dot_flops_of_a_real_gpu_matmul():
    mesh = gpu_target.target_mesh("h100-sxm", "DP1")
    a, b = (jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P())) for s in ((256, 512), (512, 1024)))
    text = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=gpu_target.COMPILER_OPTIONS).as_text()
    assert gpu_target.dot_flops(text)["total"] == 2 * 256 * 512 * 1024


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.parametrize("target", sorted(gpu_target.targets()))
def test_every_target_spec_makes_devices(target):
    """This jaxlib parses the spec (a field it does not know would fail here) and reports its GPU."""
    mesh = gpu_target.target_mesh(target, "EP8")
    device = mesh.devices.flat[0]
    assert device.platform == "gpu" and mesh.devices.size == 8
    assert device.device_kind.startswith("NVIDIA " + target.split("-")[0].upper())


@pytest.mark.gpu_compile
@needs_plugin
def test_cli_prints_one_json_object_per_program(capsys):
    import json

    from moejax.bench import compile as bench_compile

    rc = bench_compile.main(["--target", "h100-sxm", "--model", "qwen3-30b-a3b-tiny", "--layouts", "DP1,EP2",
                             "--phases", "decode,engine", "--batch", "4", "--context", "64", "--chunk", "16", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [(r["layout"], r["phase"]) for r in rows] == [
        ("DP1", "decode"), ("DP1", "engine"), ("EP2", "decode"), ("EP2", "engine")]
    for r in rows:
        assert {"model", "layout", "phase", "ok", "error", "argument_bytes", "temp_bytes", "output_bytes",
                "collectives", "custom_calls", "flops", "planner"} <= set(r)
        assert r["ok"] and r["error"] is None and r["argument_bytes"] > 0 and r["flops"] > 0
    assert rows[0]["collectives"] == {} and "all-to-all" in rows[2]["collectives"]


@pytest.mark.gpu_compile
@needs_plugin
def test_cli_compiles_a_split_layout(capsys):
    from moejax.bench import compile as bench_compile

    rc = bench_compile.main(["--target", "h100-sxm", "--model", "qwen3-30b-a3b-tiny", "--layouts", "TP4MTP1EP8",
                             "--phases", "decode", "--batch", "4", "--context", "64", "--chunk", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[1].startswith("TP4MTP1EP8       decode ") and "all-to-all:" in lines[1], lines


# Dots an fp8 model keeps in the serving dtype (numerics policy, `moejax.quant`): the router, the unembedding, the
# attention core over the cache, and MLA's absorbed kv up-projection (its query absorb and its output).
_FLOAT_SCOPES = ("moe/route/", "unembed/", "attn/core/", "attn/absorb/", "attn/out/BTNR,RNV->BTNV/")


def _decode_dots(model: str, layout: str, quantization: str | None) -> list[tuple[bool, str]]:
    """(FP8 GEMM?, op name) of every dot and GEMM call of `model`'s decode step compiled for H100 (16 rows)."""
    from moejax.bench.comm import parse_module

    cfg = moejax.load_model_config(model)
    mesh = gpu_target.target_mesh("h100-sxm", layout)
    steps, params = gpu_target.abstract_steps(cfg, layout, mesh, quantization=quantization)
    fn, args, _ = gpu_target.program(steps, params, gpu_target.Shapes(batch=16, context=256, chunk=64), "decode")
    with jax.set_mesh(mesh):
        text = fn.lower(*args).compile(compiler_options=gpu_target.COMPILER_OPTIONS).as_text()
    comps, _, _ = parse_module(text)
    out = []
    for comp in comps.values():
        types = {i.name: i.type for i in comp}
        for ins in comp:
            if ins.opcode == "dot" or (ins.opcode == "custom-call" and "__cublas$" in ins.attrs):
                name = re.search(r'op_name="([^"]*)"', ins.attrs)
                out.append((gpu_target._fp8_gemm(types, ins), name.group(1) if name else ""))
    assert sum(f for f, _ in out) == sum(gpu_target.fp8_gemms(text).values())
    return out


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.parametrize(("model", "layout", "scopes"), [
    ("qwen3-30b-a3b-tiny", "DP1", ("attn/qkv", "attn/out", "moe/experts")),
    ("deepseek-count-tiny", "DP2TP2EP2", ("attn/q", "attn/latent", "attn/out", "moe/experts", "moe/shared", "mlp")),
], ids=["qwen3-gqa", "deepseek-mla"])
def test_an_fp8_model_s_decode_step_runs_fp8_gemms_on_h100(model, layout, scopes, monkeypatch):
    """Every quantized matmul of the decode step is an FP8 GEMM (a Triton GEMM fusion over two f8e4m3fn operands:
    what XLA makes of `fp8_matmul` for H100; a one-row expert branch is a reduction, no GEMM): attention
    projections, routed experts, shared expert and dense FFN; the dots left in bf16 are the policy's float ones.
    The float model's program has no FP8 GEMM. (Opt-in: `fp8_matmul.PLATFORMS`.)"""
    from moejax.model import fp8_matmul

    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ("gpu",))
    dots = _decode_dots(model, layout, "fp8")
    fp8 = [name for is_fp8, name in dots if is_fp8]
    rest = [name for is_fp8, name in dots if not is_fp8]
    assert all(any(f"/{s}/" in name for name in fp8) for s in scopes), fp8
    assert all(any(s in name for s in _FLOAT_SCOPES) for name in rest), rest
    assert not any(is_fp8 for is_fp8, _ in _decode_dots(model, layout, None))


@pytest.mark.gpu_compile
@needs_plugin
def test_cli_reports_the_fp8_gemms_of_a_quantized_model(capsys, tmp_path, monkeypatch):
    import json

    from moejax.bench import compile as bench_compile
    from moejax.model import fp8_matmul

    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ())  # --fp8-gemm sets it

    out = tmp_path / "rows.jsonl"
    assert bench_compile.main(["--target", "h100-sxm", "--model", "qwen3-30b-a3b-tiny", "--phases", "decode",
                               "--batch", "16", "--context", "256", "--chunk", "64", "--quantization", "fp8",
                               "--fp8-gemm", "--out", str(out)]) == 0
    assert "FP8 GEMMs dot(f8e4m3fn, f8e4m3fn): " in capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["quantization"] == "fp8" and row["fp8_gemms"]["dot(f8e4m3fn, f8e4m3fn)"] > 0
    assert 0.5 < row["fp8_flops"] / row["flops"] < 1  # the router and the unembedding stay bf16


@pytest.mark.gpu_compile
@needs_plugin
@pytest.mark.xfail(strict=True, reason="FP8 GEMMs read K-minor operands: XLA transposes every fp8 weight stack "
                   "([L, ..., K, O] as stored) before the layer loop, a temporary of the whole fp8 weights; storing "
                   "fp8 values contracted-dim-last removes it (measured on a scan of 8 layers: 1.6 MB of temporaries "
                   "instead of 10 MB)")
def test_w8a8_needs_no_copy_of_the_weights(monkeypatch):
    from moejax.model import fp8_matmul

    cfg = moejax.load_model_config("qwen3-30b-a3b-tiny")
    small = gpu_target.Shapes(batch=16, context=256, chunk=64)
    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ("gpu",))
    (w8a8,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", small, ("decode",), quantization="fp8")
    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ())
    (weight_only,) = gpu_target.compile_layout(cfg, "DP1", "h100-sxm", small, ("decode",), quantization="fp8")
    assert w8a8.fp8_gemms and not weight_only.fp8_gemms
    assert w8a8.temp_bytes <= weight_only.temp_bytes + 0.1 * w8a8.planner["weights_bytes"], (
        w8a8.temp_bytes, weight_only.temp_bytes)
