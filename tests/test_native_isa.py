"""The native kernels' ISA variants (moejax.native.ISAS) against each other, and the MOEJAX_NATIVE_ISA switch.

Each variant against the float64 and XLA references is tests/test_native.py (its `isa` fixture); here the
variants this CPU runs are compared with one another: within float tolerance everywhere, and bit for bit where
the kernels' comments say so (matmul and MoE layer, x86-64-v4 against x86-64-v3: one fused multiply-add chain
per element on both; attention differs there, its dots summed in trees of 16 and of 8 lanes), on float32 and on
bfloat16 operands alike (a bfloat16 call is the float32 arithmetic on the widened values, rounded once).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import native

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = native.runnable_isas() if native.available() else ()
needs_two = pytest.mark.skipif(len(RUNNABLE) < 2, reason=f"ISA variants this host runs: {RUNNABLE}")


def _outputs(isa: str, dtype=np.float32) -> dict:
    """Every kernel on fixed inputs (few and many rows, widths past the last whole vector), on variant `isa`, with
    float operands in `dtype` (float outputs returned as float32)."""
    before = native.isa()
    native._select_isa(isa)
    try:
        rng = np.random.default_rng(0)
        normal = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape, np.float32) * scale, dtype)  # noqa: E731
        out = {}
        for M, D, F in ((3, 40, 200), (70, 64, 160)):
            wg, wu = normal(2, 4, D, F, scale=0.2), normal(2, 4, D, F, scale=0.2)
            wd = normal(2, 4, F, D, scale=0.2)
            x = normal(M, D)
            local, gate = rng.integers(-1, 4, (M, 2)).astype(np.int32), rng.random((M, 2)).astype(np.float32)
            out[f"moe_swiglu {M}x{D}x{F}"] = native.moe_swiglu(x, gate, local, wg, wu, wd, 1)
        for R, K, N in ((1, 96, 40), (9, 700, 33), (45, 257, 200)):
            out[f"matmul {R}x{K}x{N}"] = native.matmul(normal(R, K), normal(K, N))
        kp, vp = normal(1, 12, 8, 2, 40), normal(1, 12, 8, 2, 40)
        q = normal(3, 2, 4, 40)
        table = rng.permutation(12)[:9].reshape(3, 3).astype(np.int32)
        pos = np.array([[4, 5], [20, 21], [0, -1]], np.int32)
        out["paged_attention"] = native.paged_attention(q, kp, vp, 0, table, pos)
        logits = normal(4, 1001)
        logits = logits.at[1, 999].set(logits[1].max() + 1)  # in the scalar tail
        out["argmax"] = native.argmax(logits)[0]
        return {name: np.asarray(a, np.float32 if a.dtype == dtype else a.dtype) for name, a in out.items()}
    finally:
        native._select_isa(before)


@needs_two
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_variants_agree_within_float_tolerance_and_bitwise_where_claimed(dtype):
    outputs = {isa: _outputs(isa, dtype) for isa in RUNNABLE}
    first = outputs[RUNNABLE[0]]
    tol = 2e-5 if dtype == np.float32 else 2.0**-7  # bfloat16: one rounding of a float32 difference, either way
    for isa in RUNNABLE[1:]:
        for name, want in first.items():
            np.testing.assert_allclose(outputs[isa][name], want, rtol=tol, atol=tol * (np.abs(want).max() + 1),
                                       err_msg=f"{isa} against {RUNNABLE[0]}: {name}")
    if {"v4", "v3"} <= set(RUNNABLE):
        for name, want in outputs["v4"].items():
            if name.startswith(("matmul", "moe_swiglu", "argmax")):
                np.testing.assert_array_equal(outputs["v3"][name], want, err_msg=name)


@pytest.mark.skipif(not RUNNABLE, reason=f"native kernels unavailable: {native.unavailable_reason()}")
def test_select_refuses_an_unknown_variant_and_one_this_cpu_cannot_run(monkeypatch):
    before = native.isa()
    with pytest.raises(ValueError,
                       match=r"MOEJAX_NATIVE_ISA='avx9': unknown ISA variant; choose from avx512bf16, v4, v3, "):
        native._select_isa("avx9")
    monkeypatch.setattr(native, "runnable_isas", lambda: ("baseline",))
    with pytest.raises(ValueError, match=r"'v4': this CPU cannot run the x86-64-v4 \(AVX-512\) variant; it runs "
                                         r"baseline$"):
        native._select_isa("v4")
    assert native.isa() == before


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{native.ISA_ENV: value, native.ENV: "1"})
    code = "from moejax import native; print(native.isa(), native.available())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.mark.skipif(not RUNNABLE, reason=f"native kernels unavailable: {native.unavailable_reason()}")
def test_the_environment_switch_picks_the_variant_at_load_time():
    """MOEJAX_NATIVE_ISA names the variant the process runs (each one this CPU runs); a bad name is one
    ValueError line when the kernels are first asked for."""
    for isa in RUNNABLE:
        out = _isa_in_subprocess(isa)
        assert out.returncode == 0 and out.stdout.split() == [isa, "True"], out.stderr[-2000:]
    out = _isa_in_subprocess("avx9")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("ValueError: MOEJAX_NATIVE_ISA='avx9': unknown ISA variant")


@pytest.mark.skipif(not RUNNABLE, reason=f"native kernels unavailable: {native.unavailable_reason()}")
def test_the_default_is_the_best_variant_this_cpu_runs():
    assert RUNNABLE[-1] == "baseline" and set(RUNNABLE) <= set(native.ISAS)
    assert list(RUNNABLE) == [isa for isa in native.ISAS if isa in RUNNABLE]  # best first
    if not os.environ.get(native.ISA_ENV):
        assert native.isa() == RUNNABLE[0]
