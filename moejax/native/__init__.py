"""Native CPU kernels reached through XLA's FFI, each with a pure-XLA fallback chosen automatically.

`moe_swiglu` runs one MoE layer's routed experts in one call (`kernels.cc`): every routed expert's
weights read once, in place in the stacked arrays, on exactly the rows routed to it, on XLA's
intra-op threads, with a register-tiled micro-kernel, where the "loop" dispatch runs XLA:CPU's dots on
each expert, padded to a power-of-two row count. Against "loop" on bench-moe-100m (2026-12-06, a 2-vCPU
Zen 5 host shared with other jobs): 1.6-1.85x on 256- and 1024-token prefill chunks, 1.15x at 32 decode
tokens, 0.9-1.05x (no gain) at 1-16. `matmul` is the same micro-kernel as a [R, K] x [K, N] product of
one layer of a stacked weight read in place, columns split over the threads. `paged_attention` is causal
GQA over the paged KV cache reading each query's own keys in place, where the XLA path gathers every row's
whole page window and masks copies of it.
`argmax` is each row's first maximum and finiteness in one pass.

Operands: every kernel takes float32 or bfloat16 (`DTYPES`; a call's float operands all one of them, `runs`), the
result in the operands' dtype, each output element rounded once to bfloat16 (round to nearest even, as XLA's
convert). How bfloat16 is multiplied depends on the ISA variant (`bf16_arithmetic`):
- "avx512bf16" (x86-64-v4 with AVX512_BF16, `BF16_DOT_ISAS`): the gemms of `matmul` and `moe_swiglu` multiply
  bfloat16 pairs with `vdpbf16ps` (32 products per instruction, twice an FMA's, float32 accumulation): x rounded to
  bfloat16 k pairs (exact for a bfloat16 call's own operands; the MoE layer's hidden activations rounded once, as a
  bfloat16 model computes them), the weights interleaved along K in registers as they are read in place (few rows)
  or once into packed panels (above 32 rows). Deterministic and rows independent as every variant; not the float32
  kernel's bits. `paged_attention` and `argmax` are v4's.
- the others (v4, v3, baseline): the float32 arithmetic on the values widened in registers as they are loaded
  (exact: a 16-bit shift): a bfloat16 call equals the float32 kernel on the widened operands, then
  `astype(bfloat16)`, bit for bit (tests/test_native_bf16.py); intermediates stay float32.
Decode is bound by reading the weights, and half the bytes is the gain there on every variant; prefill and wide
batches are bound by the multiply-adds, where `vdpbf16ps` doubles them (bench-moe-100m against v4: unembedding at 32
/ 256 rows 6.5 -> 4.5 / 41.6 -> 29.2 ms, the MoE layer x 8 at 256 tokens 42.3 -> 28.8 ms; docs/benchmarks.md "CPU
decode against vLLM's CPU engine"). Why hand-written: XLA:CPU runs bfloat16 dots 25-50x slower than float32 on a
2-vCPU Zen 5 host (bench-moe-100m decode at batch 1: TPOT 99.7 ms in bfloat16 against 5.6 ms in float32; vLLM's
CPU build in bfloat16: 7.6 ms); its flags (oneDNN, XNNPACK, YNNPACK) do not change that, PyPI `mkl`'s bfloat16
GEMM converts to float32 and runs at sgemm speed, and scipy-openblas has no sbgemm (measured 2026-12). No AMX path
(no host with AMX to measure it on).

Weight-only int8 (`moejax.quant`'s "int8": int8 values, one scale per output channel in the serving dtype) rides on
the same micro-kernel (`matmul` and `moe_swiglu` with `scale` / `scales`; targets "moejax_matmul_int8" and
"moejax_moe_swiglu_int8"): the values and scales read in place in their stacked arrays, each int8 weight widened to
float32 as it is loaded (vpmovsxbd + vcvtdq2ps, exact), the float32 sums of a column multiplied by its scale once
after the last K block, then rounded into x's dtype (float32 or bfloat16). So a quarter of float32's weight bytes
in decode; prefill packs widened float32 panels as for bfloat16. Against XLA's dequantize-then-dot: equal up to
float32 rounding (the scale applied to the sum instead of to each weight); rows independent and v4 == v3 bit for
bit, as for float weights (tests/test_native_int8.py). `runs_int8` says whether a call's weights qualify;
`moejax.model.layers.project` and the MoE "native" dispatch route int8 weights here on CPU. int4 (blocks along the
contracted dim) and fp8 weights are still dequantized by XLA first.

The shared library is built by the package's own build (setup.py, optional: a machine without a
compiler installs without it). `available()` says whether it was built, loads, and is enabled:
MOEJAX_NATIVE=0 forces the XLA path (CI runs both), MOEJAX_NATIVE=1 or unset enables the kernels.
Callers check at trace time, so the choice is made once per compiled program, from the platform of the
mesh the program is traced for (`platform`), never the process's default backend. Inside a `shard_map` body
each result is typed as varying over every mesh axis its operands vary over (`manual.varying_like`): XLA's FFI
types a custom call's result as varying over nothing, which would blind the replication check.

The library holds each kernel compiled for three ISA variants (`ISAS`): "v4" (x86-64-v4: AVX-512), "v3"
(x86-64-v3: AVX2 + FMA) and "baseline" (the build's default target: SSE2 on x86-64), and a fourth, "avx512bf16",
that is v4 with the bfloat16 gemms above. One runs in the whole process, chosen when the library loads:
MOEJAX_NATIVE_ISA names it (a variant that is unknown, or that this CPU cannot run, is a ValueError), unset the
best this CPU runs (`runnable_isas`). `isa()` says which runs. Within a variant every result is deterministic and a
row's does not depend on the other rows (tests/test_native.py checks both bitwise for every variant the host runs).
Across variants (tests/test_native_isa.py): `matmul` and `moe_swiglu` give the same bits on v4 and v3 (one FMA
chain per element on both); `paged_attention` differs between them in the last bits (its dots summed in trees of
16 and of 8 lanes), and the baseline (no FMA) from both; avx512bf16's bfloat16 gemms are within bfloat16
tolerance of v4's (float32 operands: v4's kernels).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import manual

ENV = "MOEJAX_NATIVE"
ISA_ENV = "MOEJAX_NATIVE_ISA"
DEFAULT_ON = True
# The ISA variants, best first: MOEJAX_NATIVE_ISA's values.
ISAS = {"avx512bf16": "x86-64-v4 + AVX512_BF16 (bf16 dot products)", "v4": "x86-64-v4 (AVX-512)",
        "v3": "x86-64-v3 (AVX2 + FMA)", "baseline": "the build's default target"}
# The variants whose bfloat16 gemm multiplies bfloat16 pairs (AVX512_BF16's vdpbf16ps, float32 accumulation) instead
# of widening the weights to float32 (see the module docstring).
BF16_DOT_ISAS = ("avx512bf16",)
FFI_TARGETS = {"moejax_moe_swiglu": "MoejaxMoeSwiglu", "moejax_matmul": "MoejaxMatmul",
            "moejax_paged_attention": "MoejaxPagedAttention", "moejax_argmax": "MoejaxArgmax",
            "moejax_write_rows": "MoejaxWriteRows", "moejax_matmul_int8": "MoejaxMatmulInt8",
            "moejax_moe_swiglu_int8": "MoejaxMoeSwigluInt8"}
# A library built before these were added loads without them (`has`).
OPTIONAL_TARGETS = ("moejax_write_rows", "moejax_matmul_int8", "moejax_moe_swiglu_int8")


def enabled() -> bool:
    """The switch alone: MOEJAX_NATIVE ("0"/"1"), else the default."""
    value = os.environ.get(ENV, "").strip()
    return DEFAULT_ON if value == "" else value not in ("0", "false", "False", "no", "off")


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The library, loaded with its FFI targets registered (once per process), or why it cannot be."""
    libs = sorted(Path(__file__).parent.glob("_kernels*.so"))
    if not libs:
        return "not built (no compiler at install time, or installed without the build step)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(libs[0]))
        lib.MoejaxIsaRunnable.restype = lib.MoejaxIsa.restype = ctypes.c_char_p
        lib.MoejaxIsaSelect.argtypes = [ctypes.c_char_p]
        for target, symbol in FFI_TARGETS.items():
            if target in OPTIONAL_TARGETS and not hasattr(lib, symbol):
                continue
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as err:
        return f"{libs[0].name} does not load: {err}"
    return lib


@functools.cache
def _load() -> str | None:
    """Load the library and run the ISA variant MOEJAX_NATIVE_ISA names (unset: the best); None, or why the
    library cannot run. Raises ValueError for a variant that is unknown or that this CPU cannot run."""
    lib = _library()
    if isinstance(lib, str):
        return lib
    _select_isa(os.environ.get(ISA_ENV, "").strip() or runnable_isas()[0])
    return None


def runnable_isas() -> tuple[str, ...]:
    """The ISA variants (`ISAS`) this CPU runs, best first; () where the library does not load."""
    lib = _library()
    return () if isinstance(lib, str) else tuple(lib.MoejaxIsaRunnable().decode().split(","))


def isa() -> str | None:
    """The ISA variant the kernels run ("avx512bf16", "v4", "v3" or "baseline"); None where the library won't load."""
    return None if _load() is not None else _library().MoejaxIsa().decode()


def _select_isa(name: str) -> None:
    """Run variant `name` in every later call of this process (load time; tests, to run each variant)."""
    if name not in ISAS:
        raise ValueError(f"{ISA_ENV}={name!r}: unknown ISA variant; choose from {', '.join(ISAS)} (unset: the best "
                         f"this CPU runs)")
    if name not in runnable_isas():
        raise ValueError(f"{ISA_ENV}={name!r}: this CPU cannot run the {ISAS[name]} variant; it runs "
                         f"{', '.join(runnable_isas())}")
    _library().MoejaxIsaSelect(name.encode())


def bf16_arithmetic(name: str | None = None) -> str:
    """How the kernels of ISA variant `name` (default: the one running) compute on bfloat16 operands, in words."""
    if (name or isa()) in BF16_DOT_ISAS:
        return ("bf16 x bf16 dot products (vdpbf16ps), f32 accumulation, the MoE hidden activations rounded to bf16, "
                "one rounding per output")
    return "bf16 weights widened to f32 in registers, f32 FMA, one rounding per output"


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here (None when they can)."""
    return _load()


def available() -> bool:
    """True when the kernels are built, loaded, and switched on (MOEJAX_NATIVE unset or 1)."""
    return enabled() and _load() is None


def platform(*arrays) -> str:
    """The platform ("cpu", "gpu", "tpu") of the program being traced: that of the mesh in use.

    The mesh in the context (`jax.set_mesh`, or a `shard_map` body's), else the mesh of the first operand's
    sharding that has one, else `jax.default_backend()` (no mesh: a single-device program of this process).
    Not the process's default backend first: a CPU-hosted process compiling for a GPU target
    (`moejax.gpu_target`) must not get CPU kernels in its programs. A mesh knows its devices' platform
    (topology devices too); an `AbstractMesh` built without devices does not, and is passed over.
    """
    meshes = [jax.sharding.get_abstract_mesh()]
    meshes += [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None) for a in arrays]
    for mesh in meshes:
        found = mesh_platform(mesh)
        if found:
            return found
    return jax.default_backend()


def mesh_platform(mesh) -> str | None:
    """The platform of the devices a mesh spans (a `Mesh` or an `AbstractMesh`; topology devices of a GPU target
    too), or None for none or an `AbstractMesh` built without devices."""
    abstract = getattr(mesh, "abstract_mesh", mesh)  # a concrete Mesh carries its abstract one
    device = getattr(abstract, "abstract_device", None)
    return device.platform if device is not None and device.platform else None


DTYPES = (jnp.float32, jnp.bfloat16)  # the operand types the kernels take (all of a call's operands one of them)


def runs(*arrays) -> bool:
    """Whether a native kernel takes these operands: kernels available, a CPU program (`platform`), all float32 or
    all bfloat16 (mixed: no)."""
    dtypes = {jnp.dtype(a.dtype) for a in arrays}
    return len(dtypes) == 1 and dtypes <= set(map(jnp.dtype, DTYPES)) and platform(*arrays) == "cpu" and available()


def runs_int8(x, *weights) -> bool:
    """Whether the int8-weight kernels take x with these quantized weights (`qwix.QArray`s or
    `moejax.quant.Quantized`): `runs(x)`, each weight int8 with one scale per output column (no blocks along the
    contracted dims) in x's dtype, and the library holds the int8 targets."""
    def per_column(w):
        values, scale = (w.qvalue, w.scale) if hasattr(w, "qvalue") else (w.values, w.scale)
        contracted = [d for d in range(values.ndim) if scale.shape[d] != values.shape[d]]
        return (values.dtype == jnp.int8 and scale.dtype == x.dtype and all(scale.shape[d] == 1 for d in contracted))

    return (runs(x) and all(map(per_column, weights)) and has("moejax_matmul_int8")
            and has("moejax_moe_swiglu_int8"))


def has(target: str) -> bool:
    """Whether the loaded library holds the FFI target `target` (an `OPTIONAL_TARGETS` one may be missing)."""
    lib = _library()
    return not isinstance(lib, str) and hasattr(lib, FFI_TARGETS[target])


def _require():
    if _load() is not None:
        raise RuntimeError(f"moejax native kernels unavailable: {_load()}")


def moe_swiglu(x_MD, gate_MX, local_MX, wg, wu, wd, layer, max_threads: int = 0, scales=None):
    """Sum over routes (e, g) of each row with e a local expert: g * SwiGLU_e(x), for layer `layer`.

    Args:
      x_MD: float32 or bfloat16 [M, D] rows. gate_MX: [M, X] route weights (used in float32). local_MX: int32
        [M, X] local expert ids; any id outside [0, E) is not on this shard (skipped).
      wg, wu: [L, E, D, F]; wd: [L, E, F, D], x's dtype: the whole stacked local weights (read in place); or int8
        with `scales`: (wg's, wu's, wd's) one scale per output column, [L, E, 1, F] / [L, E, 1, D] in x's dtype
        (`moejax.quant`'s "int8"), applied to the float32 sums (the hidden activations before SiLU; the output before
        the gate), read in place too.
      layer: int32 scalar, may be traced; clamps like `lax.dynamic_slice`.
      max_threads: at most this many of XLA's intra-op threads (0: all).
    Returns:
      [M, D] in x's dtype (rows with no local route are zero; bfloat16: the hidden activations float32, each output
      rounded once). Within one ISA variant (`isa`) each element is
      one fixed sequence of operations whatever else is in the batch and however many threads run it: a
      row's result does not depend on the other rows, bit for bit.
    """
    _require()
    target = "moejax_moe_swiglu" if scales is None else "moejax_moe_swiglu_int8"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x_MD.shape, x_MD.dtype))
    operands = (x_MD, gate_MX.astype(jnp.float32), local_MX.astype(jnp.int32), wg, wu, wd, *(scales or ()),
                jnp.asarray(layer, jnp.int32).reshape(()))
    return manual.varying_like(call(*operands, max_threads=max_threads), *operands)


def matmul(x_RK, w_LKN, layer=0, max_threads: int = 0, scale=None):
    """x_RK @ w_LKN[layer] (both float32, or both bfloat16: float32 sums rounded once) on the native
    micro-kernel, the weight read in place (no slice copy); columns split over XLA's intra-op threads. w may also
    be [K, N] (layer ignored). A row's result does not depend on the other rows (bit for bit, within one ISA
    variant).

    Or w int8 with `scale`, one per output column ([L, N] or [N] with w [K, N]; any shape of that size: `quant`'s
    [L, 1, N]) in x's dtype: (x @ w[layer] summed in float32) * scale[layer], rounded once into x's dtype."""
    _require()
    w_LKN = w_LKN[None] if w_LKN.ndim == 2 else w_LKN
    target = "moejax_matmul" if scale is None else "moejax_matmul_int8"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x_RK.shape[0], w_LKN.shape[2]), x_RK.dtype))
    scales = () if scale is None else (scale.reshape(w_LKN.shape[0], w_LKN.shape[2]),)
    operands = (x_RK, w_LKN, *scales, jnp.asarray(layer, jnp.int32).reshape(()))
    return manual.varying_like(call(*operands, max_threads=max_threads), *operands)


def paged_attention(q_BTNH, k_pool, v_pool, layer, page_table_BP, pos_BT, window: int | None = None,
                    max_threads: int = 0):
    """Causal GQA of queries q_BTNH at positions pos_BT over the paged pools' layer `layer`.

    Args:
      q_BTNH: float32 or bfloat16 [B, T, N, H] (RoPE applied). k_pool, v_pool: [L, P, page, K, H] in q's
        dtype, the new tokens already written. page_table_BP: int32 [B, pages]. pos_BT: int32 (< 0: padding).
      window: sliding window (keys with q_pos - k_pos < window), None for none.
    Returns:
      [B, T, N, H] in q's dtype: softmax(q k / sqrt(H)) v over the keys at positions [0, q_pos] (within the
      window) of the row's own pages; padding queries give zeros. Equal to `attention.attend` on the
      gathered pages up to float rounding.

    A page id outside [0, P) among those the queries read is an error when the program runs (an
    XLA runtime error naming the row, the page-table entry and the id), never clamped to another page.
    """
    _require()
    H = q_BTNH.shape[-1]
    call = jax.ffi.ffi_call("moejax_paged_attention", jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype))
    operands = (q_BTNH, k_pool, v_pool, jnp.asarray(layer, jnp.int32).reshape(()), page_table_BP.astype(jnp.int32),
                pos_BT.astype(jnp.int32))
    out = call(*operands, window=int(window or 0), scale=np.float32(H**-0.5), max_threads=max_threads)
    return manual.varying_like(out, *operands)


def argmax(x_BV, max_threads: int = 0):
    """(index [B] int32, finite [B] bool) of float32 or bfloat16 x_BV [B, V]: the first maximum of each row (the
    first NaN where it has one: `jnp.argmax`), and whether the row is all finite.

    Under a mesh, each device's rows are done where they are (a `shard_map` over x's row sharding):
    a custom call has no sharding rule of its own. x's vocabulary must not be split.
    """
    _require()

    def local(x_):
        call = jax.ffi.ffi_call("moejax_argmax", (jax.ShapeDtypeStruct((x_.shape[0],), jnp.int32),) * 2)
        index_, finite_ = (manual.varying_like(a, x_) for a in call(x_, max_threads=max_threads))
        return index_, finite_.astype(bool)

    sharding = getattr(jax.typeof(x_BV), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return local(x_BV)
    rows, vocab = (tuple(sharding.spec) + (None, None))[:2]
    if vocab is not None:
        raise ValueError(f"native.argmax: the vocabulary axis of x must not be split (spec {sharding.spec})")
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=spec(rows, None), out_specs=(spec(rows), spec(rows)))(x_BV)


def write_rows(pool, rows_MR, layer, page_M, slot_M):
    """`pool` [L, P, S, ...] with rows_MR [M, ...] written at (layer, page_M[m], slot_M[m]), in place where the pool
    is donated (the result aliases it); a page outside [0, P) or a slot outside [0, S) is dropped (a scatter's
    mode="drop"); `layer` clamps like `lax.dynamic_slice`. Any element type (bytes are copied): for bfloat16 pools,
    which XLA:CPU scatters into by converting the whole pool to float32 and back."""
    _require()
    call = jax.ffi.ffi_call("moejax_write_rows", jax.ShapeDtypeStruct(pool.shape, pool.dtype),
                            input_output_aliases={0: 0})
    operands = (pool, rows_MR.astype(pool.dtype), jnp.asarray(layer, jnp.int32).reshape(()), page_M.astype(jnp.int32),
                slot_M.astype(jnp.int32))
    return manual.varying_like(call(*operands), *operands)
