"""Native kernels with int8 weights (`moejax.quant`'s "int8": values int8, one scale per output column, read in
place): `matmul` and `moe_swiglu` against XLA's dequantize-then-multiply reference, rows independent bit for bit,
bfloat16 activations == the float32 kernel on the widened operands rounded once (bitwise), v4 == v3 bitwise, and
the model's routing: projections and experts take the kernels, with the same greedy tokens as MOEJAX_NATIVE=0.

Tolerance against the reference: float32 rounding only. The kernel sums x * q in float32 (q exact in float32) and
multiplies the sum by the column's scale once; the reference multiplies each weight by its scale first. Both are
the same real number, each side off by float32 roundings of a sum of K terms: |diff| <= ~K * 2^-24 * sum |x w|,
checked as rtol 2e-5 and atol 2e-5 * (max |y| + 1), the float32 kernels' own tolerance (tests/test_native.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import native, quant
from tests.test_native import _reference, isa  # noqa: F401 (isa: a fixture)

needs_int8 = pytest.mark.skipif(not native.available() or not native.has("moejax_matmul_int8"),
                                reason=f"native int8 kernels unavailable: {native.unavailable_reason()}")


def _quantized(rng, shape, contracted, dtype=jnp.float32):
    """(values int8, scale [shape with the contracted dims 1] in `dtype`) of a random float weight (quant's own
    quantizer, per output channel)."""
    w = rng.standard_normal(shape).astype(np.float32) * 0.2
    blocks = tuple(1 for _ in contracted)
    values, scale = quant.quantize_block(w, contracted, quant.SCHEMES["int8"], blocks, dtype)
    return jnp.asarray(values), jnp.asarray(scale)


def _dense(values, scale):
    return np.asarray(values, np.float64) * np.asarray(scale, np.float64)


@needs_int8
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("K, N", [(96, 40), (700, 33), (257, 200), (64, 1024)])
def test_matmul_int8_equals_dequantize_then_matmul(K, N):
    rng = np.random.default_rng(K + N)
    values, scale = _quantized(rng, (3, K, N), (1,))
    assert values.dtype == jnp.int8 and scale.shape == (3, 1, N)
    call = jax.jit(native.matmul, static_argnames="max_threads")
    for R in (1, 2, 7, 9, 33, 45):  # 33, 45: above 32 rows, packed panels
        x = jnp.asarray(rng.standard_normal((R, K), np.float32))
        for layer in (0, 2):
            want = np.asarray(x, np.float64) @ _dense(values, scale)[layer].reshape(K, N)
            # XLA's path: the layer's slice dequantized into x's dtype, then the dot
            xla = np.asarray(x @ quant.dense(quant.qwix.QArray(values[layer], scale[layer], qtype=jnp.int8),
                                             jnp.float32))
            for threads in (1, 0):
                got = np.asarray(call(x, values, layer, max_threads=threads, scale=scale))
                for ref in (want, xla):
                    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * (np.abs(ref).max() + 1))


@needs_int8
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("L, E, D, F", [(1, 1, 8, 8), (3, 4, 64, 96), (2, 8, 40, 200), (1, 2, 600, 20)])
def test_moe_swiglu_int8_equals_the_dequantized_reference(L, E, D, F):
    rng = np.random.default_rng(L * 1000 + F)
    (wg, sg), (wu, su) = (_quantized(rng, (L, E, D, F), (2,)) for _ in range(2))
    wd, sd = _quantized(rng, (L, E, F, D), (2,))
    dense = [_dense(v, s) for v, s in ((wg, sg), (wu, su), (wd, sd))]
    call = jax.jit(native.moe_swiglu, static_argnames="max_threads")
    for M in (1, 5, 17, 150):  # 150: above 32 rows per expert for the smaller E (packed panels)
        x = jnp.asarray(rng.standard_normal((M, D), np.float32))
        local = jnp.asarray(rng.integers(-1, E + 2, (M, 2)), jnp.int32)
        gate = jnp.asarray(rng.random((M, 2)), jnp.float32)
        for layer in sorted({0, L - 1}):
            want = _reference(x, gate, local, *dense, layer)
            for threads in (1, 0):
                got = call(x, gate, local, wg, wu, wd, layer, max_threads=threads, scales=(sg, su, sd))
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * (np.abs(want).max() + 1))


@needs_int8
@pytest.mark.usefixtures("isa")
def test_int8_rows_do_not_depend_on_the_others_and_bfloat16_is_the_float32_kernel_rounded():
    rng = np.random.default_rng(7)
    values, scale = _quantized(rng, (2, 200, 72), (1,))
    (wg, sg), (wu, su) = (_quantized(rng, (2, 4, 40, 200), (2,)) for _ in range(2))
    wd, sd = _quantized(rng, (2, 4, 200, 40), (2,))
    x = jnp.asarray(rng.standard_normal((40, 200), np.float32))
    xm = jnp.asarray(rng.standard_normal((40, 40), np.float32))
    local = jnp.asarray(rng.integers(0, 4, (40, 2)), jnp.int32)
    gate = jnp.asarray(rng.random((40, 2)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        s, ss = scale.astype(dtype), tuple(a.astype(dtype) for a in (sg, su, sd))
        full = np.asarray(native.matmul(x.astype(dtype), values, 1, scale=s).astype(jnp.float32))
        moe_full = np.asarray(native.moe_swiglu(xm.astype(dtype), gate, local, wg, wu, wd, 1, scales=ss)
                              .astype(jnp.float32))
        for rows in (slice(0, 1), slice(3, 11), slice(5, 38)):
            part = native.matmul(x[rows].astype(dtype), values, 1, scale=s).astype(jnp.float32)
            np.testing.assert_array_equal(np.asarray(part), full[rows])
            part = native.moe_swiglu(xm[rows].astype(dtype), gate[rows], local[rows], wg, wu, wd, 1, scales=ss)
            np.testing.assert_array_equal(np.asarray(part.astype(jnp.float32)), moe_full[rows])
        if dtype == jnp.bfloat16:  # == the float32 kernel on the widened operands, rounded once
            xw, sw = x.astype(dtype).astype(jnp.float32), s.astype(jnp.float32)
            want = native.matmul(xw, values, 1, scale=sw).astype(dtype).astype(jnp.float32)
            np.testing.assert_array_equal(full, np.asarray(want))
            sws = tuple(a.astype(jnp.float32) for a in ss)
            want = native.moe_swiglu(xm.astype(dtype).astype(jnp.float32), gate, local, wg, wu, wd, 1, scales=sws)
            np.testing.assert_array_equal(moe_full, np.asarray(want.astype(dtype).astype(jnp.float32)))


@needs_int8
@pytest.mark.skipif(not {"v4", "v3"} <= set(native.runnable_isas() if native.available() else ()),
                    reason="needs the v4 and v3 variants")
def test_int8_kernels_give_the_same_bits_on_v4_and_v3():
    rng = np.random.default_rng(3)
    values, scale = _quantized(rng, (2, 257, 200), (1,))
    (wg, sg), (wu, su) = (_quantized(rng, (2, 4, 64, 160), (2,)) for _ in range(2))
    wd, sd = _quantized(rng, (2, 4, 160, 64), (2,))
    before, out = native.isa(), {}
    try:
        for variant in ("v4", "v3"):
            native._select_isa(variant)
            res = []
            for R in (1, 9, 45):
                x = jnp.asarray(np.random.default_rng(R).standard_normal((R, 257), np.float32))
                res.append(np.asarray(native.matmul(x, values, 1, scale=scale)))
            for M in (3, 70):
                x = jnp.asarray(np.random.default_rng(M).standard_normal((M, 64), np.float32))
                local = jnp.asarray(np.random.default_rng(M).integers(-1, 4, (M, 2)), jnp.int32)
                gate = jnp.asarray(np.random.default_rng(M).random((M, 2)), jnp.float32)
                res.append(np.asarray(native.moe_swiglu(x, gate, local, wg, wu, wd, 1, scales=(sg, su, sd))))
            out[variant] = res
    finally:
        native._select_isa(before)
    for a, b in zip(out["v4"], out["v3"], strict=True):
        np.testing.assert_array_equal(a, b)


def _traced_int8_calls(monkeypatch, switch: str) -> dict:
    """Switch the kernels on ("1") or off ("0") with fresh traces; count the int8-weight kernel calls traced."""
    monkeypatch.setenv(native.ENV, switch)
    jax.clear_caches()
    calls = {}

    def counting(name, fn, key):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + (kwargs.get(key) is not None)
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(native, "matmul", counting("matmul", native.matmul, "scale"))
    monkeypatch.setattr(native, "moe_swiglu", counting("moe_swiglu", native.moe_swiglu, "scales"))
    return calls


@needs_int8
@pytest.mark.slow  # 24 s: the suite's time; the kernels' own tests above run by default
def test_an_int8_model_on_the_kernels_matches_the_xla_path(monkeypatch):
    """tiny-moe with int8 weights: projections and experts on the int8 kernels. float32: logits within float32
    rounding of MOEJAX_NATIVE=0 (XLA dequantizing each layer's slice), the same greedy tokens. bfloat16: XLA rounds
    the dequantized weights and every op's output to bfloat16, the kernels each output once, so both are compared
    with the float32 model (same int8 values): the kernels' logits no farther from it than XLA's."""
    import moejax

    cfg = moejax.load_model_config("tiny-moe")
    ids = np.array([[1, 5, 9, 2, 7, 3, 8, 4], [6, 2, 2, 9, 1, 1, 5, 3]], np.int32)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40)), [9] * 12]
    logits, tokens = {}, {}
    for dtype in ("float32", "bfloat16"):
        for switch in ("1", "0"):
            calls = _traced_int8_calls(monkeypatch, switch)
            model = moejax.Model.random(cfg, seed=3, dtype=dtype, quantization="int8")
            logits[dtype, switch] = np.asarray(model.forward(ids), np.float32)
            if dtype == "float32":
                tokens[switch] = model.generate(prompts, max_new_tokens=8)
            if switch == "1":
                assert calls.get("matmul", 0) > 0 and calls.get("moe_swiglu", 0) > 0, calls
    want = logits["float32", "0"]
    np.testing.assert_allclose(logits["float32", "1"], want, rtol=0, atol=2e-5 * (np.abs(want).max() + 1))
    assert tokens["1"] == tokens["0"]
    native_err = np.linalg.norm(logits["bfloat16", "1"] - want)
    assert native_err <= 1.1 * np.linalg.norm(logits["bfloat16", "0"] - want), native_err
