"""FP8 compute (W8A8, `moejax.model.fp8_matmul`): the function against a float reference on the same quantized
operands, where it applies (e4m3 weights in a GPU program only), and a whole model with the path forced on CPU
against the weight-only model. The compiled H100 program's FP8 GEMMs: tests/test_gpu_compile.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from jax.sharding import AbstractDevice, AbstractMesh

import moejax
from moejax.model import fp8_matmul
from moejax.model.ffn import swiglu
from tests.test_quant import CONFIGS, IDS

E4M3 = jnp.float8_e4m3fn


def _gpu_mesh() -> AbstractMesh:
    """A one-device mesh whose device reports "gpu", as topology devices of a GPU target do."""
    device = AbstractDevice(device_kind="fake gpu", num_cores=None, platform="gpu")
    return AbstractMesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), abstract_device=device)


def _reference(x, q, contract):
    """x quantized per row and block here (numpy: max|x| / 448, rounded to e4m3), times the dequantized weight,
    in float64."""
    K = q.shape[:contract]
    C = q.scale.shape[:contract]
    rows = np.asarray(x, np.float32).reshape(-1, *K)
    split = [n for k, c in zip(K, C, strict=True) for n in (c, k // c)]
    xb = rows.reshape(len(rows), *split)
    s = np.abs(xb).max(axis=tuple(2 + 2 * i for i in range(contract)), keepdims=True) / 448
    s = np.where(s > 0, s, 1)
    xq = np.asarray(jnp.asarray(xb / s).astype(E4M3).astype(jnp.float32), np.float64) * s
    w = np.asarray(qwix.dequantize(q), np.float64).reshape(int(np.prod(K)), -1)
    return (xq.reshape(len(rows), -1) @ w).reshape(*x.shape[:x.ndim - contract], *q.shape[contract:])


CASES = {  # x shape, weight shape, contracted dims, qwix tiles (blocks along contracted dims)
    "per-channel": ((3, 5, 64), (64, 48), 1, {}),
    "blocks": ((3, 5, 256), (256, 48), 1, {0: 64}),
    "two-dims": ((2, 3, 4, 16), (4, 16, 24), 2, {}),
    "two-dims-blocked-last": ((2, 3, 4, 32), (4, 32, 24), 2, {1: 8}),
    "two-dims-blocked-both": ((2, 3, 4, 32), (4, 32, 24), 2, {0: 1, 1: 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matmul_is_the_float_product_of_the_same_quantized_operands(case):
    """Only float32 accumulation differs: measured <= 1.3e-7 of the largest output (2026-12, XLA:CPU)."""
    xs, ws, contract, tiles = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs) * np.exp(rng.standard_normal(xs[:-1] + (1,))), jnp.float32)
    q = qwix.quantize(jnp.asarray(rng.standard_normal(ws), jnp.float32), E4M3,
                      channelwise_axes=tuple(range(contract, len(ws))), tiled_axes=tiles)
    y = jax.jit(fp8_matmul.matmul, static_argnums=2)(x, q, contract)
    ref = _reference(x, q, contract)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= 1e-6 * np.abs(ref).max()


def test_bfloat16_activations_give_bfloat16_within_its_rounding():
    xs, ws, contract, tiles = CASES["blocks"]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(xs), jnp.bfloat16)
    q = qwix.quantize(jnp.asarray(rng.standard_normal(ws), jnp.float32), E4M3, channelwise_axes=(1,),
                      tiled_axes=tiles).astype(jnp.bfloat16)
    y = fp8_matmul.matmul(x, q)
    assert y.dtype == jnp.bfloat16
    ref = _reference(x.astype(jnp.float32), q, contract)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-8, atol=2**-8 * np.abs(ref).max())


def test_activation_scales_map_each_row_s_largest_value_to_448_and_zero_rows_to_zero():
    x = jnp.array([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0], [1e-30, 2e-30, 0.0]], jnp.float32)
    xq, s = fp8_matmul.quantize_activation(x, (1,))
    assert s.shape == (3, 1) and xq.dtype == E4M3
    np.testing.assert_array_equal(np.asarray(xq.astype(jnp.float32))[:, 1], [-448, 0, 448])
    np.testing.assert_array_equal(np.asarray(s)[1], [1.0])  # a zero row: scale 1, values 0
    assert np.all(np.isfinite(np.asarray(xq.astype(jnp.float32))))


def test_applies_to_e4m3_weights_in_gpu_programs_only(monkeypatch):
    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ("gpu",))  # opt-in (MOEJAX_FP8_GEMM=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    fp8 = qwix.quantize(w, E4M3, channelwise_axes=(1,))
    int8 = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))

    def f8_dots(fn):
        return [e for e in jax.make_jaxpr(fn)(x).eqns if e.primitive.name == "dot_general"
                and all(v.aval.dtype == E4M3 for v in e.invars)]

    assert not fp8_matmul.applies(x, fp8)  # a CPU program: weight-only
    assert f8_dots(lambda a: fp8_matmul.dot(a, fp8)) == []
    with jax.sharding.use_abstract_mesh(_gpu_mesh()):
        assert fp8_matmul.applies(x, fp8)
        assert not fp8_matmul.applies(x, int8) and not fp8_matmul.applies(x, w)
        monkeypatch.setattr(fp8_matmul, "PLATFORMS", ())  # the default: GPU programs dequantize too
        assert not fp8_matmul.applies(x, fp8)
        monkeypatch.setattr(fp8_matmul, "PLATFORMS", ("gpu",))
        assert len(f8_dots(lambda a: fp8_matmul.dot(a, fp8))) == 1
        assert f8_dots(lambda a: fp8_matmul.dot(a, int8)) == []
        assert len(f8_dots(lambda a: swiglu(a, fp8, fp8, qwix.quantize(w.T, E4M3, channelwise_axes=(1,))))) == 3


@pytest.mark.parametrize("family", [f if f == "mixtral" else pytest.param(f, marks=pytest.mark.slow) for f in CONFIGS])
def test_forced_w8a8_model_is_within_2x_of_the_weight_rounding_s_own_error(family, monkeypatch):
    """The W8A8 model (the fp8 path forced on CPU: XLA:CPU runs an f8 dot by converting both operands to float32,
    so this is the GPU's arithmetic up to accumulation order) against the weight-only one.

    The bound: rounding each activation to e4m3 with a per-row absmax scale is an error of the same kind and size
    as rounding each weight to e4m3 with a per-channel one (3 mantissa bits both), so its effect on the logits is
    of the size of the weight rounding's, measured here as weight-only vs float. Measured ratios (max / mean
    logit difference): mixtral 0.86 / 0.82, deepseek 0.99 / 0.80 (2026-12, float32, 3 layers); asserted <= 2x.
    """
    cfg = CONFIGS[family]
    weight_only = moejax.Model.random(cfg, seed=1, layout="DP1", quantization="fp8").forward(IDS)
    float_logits = moejax.Model.random(cfg, seed=1, layout="DP1").forward(IDS)
    monkeypatch.setattr(fp8_matmul, "PLATFORMS", ("gpu", "cpu"))
    w8a8 = moejax.Model.random(cfg, seed=1, layout="DP1", quantization="fp8").forward(IDS)
    weights_err, act_err = np.abs(weight_only - float_logits), np.abs(w8a8 - weight_only)
    assert act_err.max() > 1e-3  # the activations really were quantized
    assert act_err.max() <= 2 * weights_err.max() and act_err.mean() <= 2 * weights_err.mean(), (
        act_err.max(), weights_err.max(), act_err.mean(), weights_err.mean())
