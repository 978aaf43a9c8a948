"""Quantized KV cache ("fp8", "int8"): the format's round trip, the pools' dtypes and bytes (== the one formula == the
planner), decoding close to the float cache, sharded == unsharded, and refusals of unknown names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import ServeConfig, kv_cache
from moejax.bench import kv_bytes, kv_quant
from moejax.config import KV_CACHE_DTYPES, ModelConfig
from moejax.mesh import Layout
from moejax.planner.memory import kv_bytes_per_token_layer
from moejax.planner.workload import Workload
from tests import hf_models

TINY = np.finfo(np.float32).tiny


def _vectors(seed=0):
    """[rows, 64] float32 vectors spanning magnitudes (1e-30 .. 1e4 per row), a few outliers per row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 64)) * 10.0 ** rng.uniform(-30, 4, (256, 1))
    x[:, :3] *= 20  # outliers: most values sit far below the absmax
    return x.astype(np.float32)


def _round_trip(x, kv):
    values, scale = jax.jit(kv_cache.quantize, static_argnums=1)(jnp.asarray(x), kv)
    return values, np.asarray(scale), np.asarray(kv_cache.dequantize(values, scale, jnp.float32))


def test_int8_round_trip_is_within_half_a_step_of_absmax_over_127():
    x = _vectors()
    values, scale, back = _round_trip(x, "int8")
    absmax = np.abs(x).max(-1, keepdims=True)
    assert values.dtype == jnp.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, absmax[:, 0] / 127, rtol=1e-6)
    err = np.abs(back - x)
    assert np.all(err <= absmax / 127)  # the bound asked for
    assert np.all(err <= absmax / 254 * (1 + 1e-5))  # what rounding to nearest gives: half a step


def test_fp8_round_trip_is_within_2_to_the_minus_4_relative():
    x = _vectors(1)
    values, scale, back = _round_trip(x, "fp8")
    absmax = np.abs(x).max(-1, keepdims=True)
    assert values.dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(scale, absmax[:, 0] / 448, rtol=1e-6)
    err = np.abs(back - x)
    # e4m3 keeps 3 mantissa bits: half a unit in the last place is 2^-4 of a value in the normal range (|x| / scale
    # >= 2^-6); below it the spacing is fixed, 2^-9 of the scale (half of it at most).
    normal = np.abs(x) >= scale[:, None] * 2.0**-6
    assert np.all(err[normal] <= 2.0**-4 * np.abs(x[normal]) * (1 + 1e-6))
    assert np.all(err[~normal] <= np.broadcast_to(scale[:, None], x.shape)[~normal] * 2.0**-10 * (1 + 1e-6))
    assert np.all(np.abs(back) <= absmax * (1 + 1e-6))  # nothing past the absmax (448 is an e4m3 value)


def test_fp8_codes_read_by_their_bits_as_xla_converts_them():
    codes = jnp.asarray(np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn))
    ours = np.asarray(kv_cache.dequantize(codes, jnp.ones(()), jnp.float32))
    xla = np.asarray(codes.astype(jnp.float32))
    nan = np.isnan(xla)
    assert nan.sum() == 2 and np.array_equal(ours[~nan], xla[~nan])  # every code but the two NaNs (never written)


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
def test_zero_and_non_finite_rows(kv):
    x = np.ones((4, 8), np.float32)
    x[0] = 0.0
    x[1, 3] = np.nan
    x[2] = 1e-44  # a float32 subnormal: absmax / 448 underflows to 0 without the floor
    values, scale, back = _round_trip(x, kv)
    assert scale[0] == TINY and np.all(back[0] == 0)  # finite scale, zeros back: no NaN from 0 / 0
    assert np.isnan(scale[1]) and np.all(np.isnan(back[1]))  # a NaN token reads NaN (the request's error)
    assert scale[2] == TINY and np.all(np.isfinite(back[2])) and np.all(np.abs(back[2]) <= 1e-37)
    np.testing.assert_allclose(back[3], 1.0)


def _cfg(family: str) -> ModelConfig:
    hf = hf_models.hf_config(family).to_dict()
    return ModelConfig.from_hf({**hf, "model_type": hf.get("model_type") or family})


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_pools_hold_one_byte_per_value_and_a_float32_scale(family, kv, models_1dev):
    steps = models_1dev[family].steps
    cache = steps.new_cache(6, 4, kv)
    for pool, shape in zip(cache, steps.cache_shapes(6, 4), strict=True):
        assert isinstance(pool, kv_cache.QuantizedPool)
        assert pool.values.shape == shape and pool.values.dtype == kv_cache.STORAGE[kv]
        assert pool.scale.shape == shape[:-1] and pool.scale.dtype == jnp.float32
    cfg = models_1dev[family].cfg
    stored = sum(b.nbytes for b in jax.tree.leaves(cache))
    assert stored == cfg.kv_bytes_per_token(kv) * 6 * 4  # DP1: every layer, every slot on the one device


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("layout", ["DP1", "TP2", "DP2", "TP4EP2"])
def test_quantized_pool_bytes_equal_the_formula_and_the_planner(family, layout, kv):
    cfg = _cfg(family)
    row = kv_bytes.measure(cfg, layout, "float32", kv_cache_dtype=kv)
    assert row["runtime_bytes"] == row["planner_bytes"]
    tensor = int(layout.split("TP")[1][0]) if "TP" in layout else 1
    per_layer = cfg.kv_bytes_per_token(kv) / cfg.num_layers
    if cfg.attention == "mla":  # R + r one-byte values and one scale per token, replicated over tensor
        assert row["runtime_bytes"] == per_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim + 4
    else:  # per kv head: H one-byte values and a 4-byte scale, for k and v
        heads = max(cfg.num_kv_heads, tensor) / tensor
        assert row["runtime_bytes"] == per_layer * heads / cfg.num_kv_heads == 2 * heads * (cfg.head_dim + 4)
    assert kv_bytes_per_token_layer(cfg, Layout(), Workload(kv_precision=kv)) == per_layer


def test_allocated_quantized_pools_measure_what_the_trace_says():
    cfg = _cfg("deepseek_v3")
    traced = kv_bytes.measure(cfg, "DP2EP2", "float32", kv_cache_dtype="fp8")
    allocated = kv_bytes.measure(cfg, "DP2EP2", "float32", allocate=True, kv_cache_dtype="fp8")
    assert allocated["runtime_bytes"] == traced["runtime_bytes"] == traced["planner_bytes"]


def _sequences(vocab=128, rows=4, length=32, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (rows, length))


# Teacher-forced decode (one token per paged step, 4 rows x 32 positions, the tiny random checkpoints of
# tests/hf_models.py, float32; logits up to 5.5, standard deviation 1.4) with the quantized cache against the float
# one, measured 2026-12 (`kv_quant.teacher_forced_logits`):
#   mixtral     fp8: top-1 0.852, mean |dlogit| 0.115, max 1.88;  int8: top-1 0.938, mean 0.037, max 1.84
#   deepseek_v3 fp8: top-1 0.922, mean |dlogit| 0.105, max 3.26;  int8: top-1 0.953, mean 0.034, max 2.32
# (a bfloat16 cache: top-1 1.0 / 1.0, mean 0.0075 / 0.0095, max 0.05 / 0.71). The max is set by routing flips (a
# token's top-k experts change: a jump, not a drift), so the bounds are on the mean (about 2x the measured) and
# on top-1 (a margin of 4-6 positions in 128). The CPU computes these deterministically; the margin is for another
# ISA variant of the native kernels or another XLA, not for noise.
CLOSE = {("mixtral", "fp8"): (0.25, 0.8), ("mixtral", "int8"): (0.08, 0.9),
         ("deepseek_v3", "fp8"): (0.22, 0.88), ("deepseek_v3", "int8"): (0.07, 0.92)}


def test_cached_attention_over_a_quantized_pool_is_attention_over_its_dequantized_values():
    # The paged path (CPU: the native kernel over the dequantized window; MOEJAX_NATIVE=0: XLA) against `attend`
    # over the round-tripped keys and values: the same numbers up to float rounding.
    from moejax.model import attention

    B, T, N, K, H, ps, MP = 3, 10, 4, 2, 16, 4, 3
    rng = np.random.default_rng(5)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)) * 3, jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, T, N, H)) * 3, jnp.float32)
    pos = jnp.asarray(np.where(np.arange(T) < [[10], [7], [3]], np.arange(T), -1), jnp.int32)  # padded rows
    table = jnp.asarray(rng.permutation(B * MP).reshape(B, MP), jnp.int32)
    for kv in KV_CACHE_DTYPES:
        pools = tuple(kv_cache.QuantizedPool(jnp.zeros((2, B * MP, ps, K, H), kv_cache.STORAGE[kv]),
                                             jnp.zeros((2, B * MP, ps, K), jnp.float32)) for _ in range(2))

        @jax.jit
        def paged(pools, q, k, v):
            pools = tuple(attention.write_pages(p, 1, new, pos, table) for p, new in zip(pools, (k, v), strict=True))
            return attention.cached_attention(q, pools, 1, table, pos, None, H**-0.5)

        k_, v_ = (kv_cache.dequantize(*kv_cache.quantize(a, kv), jnp.float32) for a in (k, v))
        want = attention.attend(q, k_, v_, pos, pos)
        valid = np.asarray(pos >= 0)
        np.testing.assert_allclose(np.asarray(paged(pools, q, k, v))[valid], np.asarray(want)[valid], atol=2e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_decode_with_a_quantized_cache_is_close_to_the_float_cache(family, models_1dev):
    model = models_1dev[family]
    seqs = _sequences()
    ref = kv_quant.teacher_forced_logits(model, seqs, None)
    np.testing.assert_allclose(ref, model.forward(seqs), atol=1e-4, rtol=0)  # the float cache: the forward
    errors = {}
    for kv in KV_CACHE_DTYPES:
        logits = kv_quant.teacher_forced_logits(model, seqs, kv)
        mean_bound, top1_bound = CLOSE[family, kv]
        errors[kv] = np.abs(logits - ref).mean()
        assert 0 < errors[kv] < mean_bound, (kv, errors[kv])  # 0 <: the cache really is quantized
        assert np.mean(logits.argmax(-1) == ref.argmax(-1)) >= top1_bound
    assert errors["int8"] < errors["fp8"]  # 7 bits of mantissa against 3


@pytest.mark.parametrize("layout,family", [("TP2", "mixtral"), pytest.param("DP2", "mixtral", marks=pytest.mark.slow),
                                           pytest.param("DP2TP2EP2", "mixtral", marks=pytest.mark.slow),
                                           pytest.param("TP2", "deepseek_v3", marks=pytest.mark.slow),
                                           ("DP2EP2", "deepseek_v3")])
def test_sharded_quantized_cache_equals_one_device(layout, family, hf_checkpoints, models_1dev):
    # Scales are per (token, kv head): a shard holding some of the kv heads stores the bytes one device stores for
    # them, given the same keys and values. Those differ by float rounding (<= 1e-5 in the logits with a float cache:
    # sums split over tensor add in another order), and a value within rounding of a quantization boundary may
    # round to the neighbouring code: a step of the format (2^-4 relative, fp8), not a float error. Measured
    # 2026-12: at most 1e-3 in the logits (TP2, mixtral), no top-1 changed.
    import moejax

    model = moejax.load(hf_checkpoints[family][0], layout=layout)
    seqs = _sequences(rows=4, length=12, seed=1)
    for kv in KV_CACHE_DTYPES:
        sharded = kv_quant.teacher_forced_logits(model, seqs, kv)
        one = kv_quant.teacher_forced_logits(models_1dev[family], seqs, kv)
        np.testing.assert_allclose(sharded, one, atol=5e-3, rtol=0)
        assert np.array_equal(sharded.argmax(-1), one.argmax(-1))


def test_model_generate_uses_the_model_s_kv_cache_dtype(hf_checkpoints, models_1dev):
    import moejax

    path, _ = hf_checkpoints["mixtral"]
    model = moejax.load(path, kv_cache_dtype="int8")
    prompts = _sequences(rows=2, length=9, seed=2).tolist()
    got = model.generate(prompts, 8)
    engine = moejax.Engine(models_1dev["mixtral"], ServeConfig(max_running=2, page_size=4, num_pages=8,
                                                               kv_cache_dtype="int8"))
    assert engine.kv_cache_dtype == "int8" and isinstance(engine.cache[0], kv_cache.QuantizedPool)
    assert got == engine.generate(prompts, moejax.SamplingParams(max_new_tokens=8))
    assert moejax.Engine(model, ServeConfig(max_running=2, page_size=4, num_pages=8)).kv_cache_dtype == "int8"


BAD = ["fp16", "FP8", "float8", "", 8, "auto"]


@pytest.mark.parametrize("bad", BAD)
def test_unknown_kv_cache_dtypes_are_refused_by_name(bad, hf_checkpoints):
    import moejax

    with pytest.raises(ValueError, match=r"ServeConfig.kv_cache_dtype must be one of \['fp8', 'int8'\] or None "
                                         r"\(the serving dtype\), got " + repr(bad).replace("'", "'?")):
        ServeConfig(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match=r"^kv_cache_dtype must be one of \['fp8', 'int8'\]"):
        moejax.load(hf_checkpoints["mixtral"][0], kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="unknown KV cache format"):
        _cfg("mixtral").kv_bytes_per_token("fp16")
    with pytest.raises(ValueError, match="unknown kv precision"):
        Workload(kv_precision="fp16")


def test_cli_refuses_an_unknown_kv_cache_dtype_in_one_line(capsys):
    from moejax import cli

    assert cli.main(["generate", "--kv-cache-dtype", "fp4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        "moejax: error: argument --kv-cache-dtype: invalid choice: 'fp4' (choose from 'auto', 'fp8', 'int8') "
        "(see 'moejax generate --help')"]
    assert cli.main(["plan", "--kv-precision", "fp4"]) == 2
    assert capsys.readouterr().err.startswith("moejax: error: argument --kv-precision: invalid choice: 'fp4'")


def test_quantized_pools_choose_the_native_kernel_over_the_dequantized_window_on_cpu():
    from moejax.model.attention import choose_paged_attention

    pool = (2, 64, 16, 4, 128)
    assert choose_paged_attention("cpu", True, pool, quantized=True) == "native-dequantized"
    assert choose_paged_attention("cpu", False, pool, quantized=True) == "xla"
    assert choose_paged_attention("gpu", False, pool, quantized=True) == "xla"  # the Pallas kernel takes float pools
    assert choose_paged_attention("cpu", True, pool, same_kv=False, quantized=True) == "xla"  # MLA


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
@pytest.mark.parametrize("tail", [(2, 8), ()])  # GQA (K, H) vectors; MLA: one latent vector per token
def test_native_quantized_write_equals_the_scatter_bit_for_bit(kv, tail, monkeypatch):
    """`kv_cache.write` on CPU (native `write_rows`, values and scales) writes the same bits as XLA's scatter
    (MOEJAX_NATIVE=0), pages outside the pool dropped, in place under donation."""
    from moejax import native

    if not native.available() or not native.has("moejax_write_rows"):
        pytest.skip("native kernels not built")
    rng = np.random.default_rng(1)
    shape = (3, 5, 4, *tail, 16) if tail else (3, 5, 4, 16)
    values, scale = kv_cache.quantize(jnp.asarray(rng.standard_normal(shape), jnp.float32), kv)
    new = jnp.asarray(rng.standard_normal((2, 3, *shape[3:])), jnp.float32)
    page = jnp.array([[0, 4, 5], [2, 4, 1]], jnp.int32)  # 5: outside [0, 5), dropped
    slot = jnp.array([[3, 0, 1], [3, 2, 1]], jnp.int32)
    got = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("MOEJAX_NATIVE", switch)
        pool = kv_cache.QuantizedPool(jnp.array(values), jnp.array(scale))
        out = jax.jit(lambda p, n: kv_cache.write(p, (1, page, slot), n), donate_argnums=0)(pool, new)
        got[switch] = [np.asarray(kv_cache._bits(a)).view(np.uint8) for a in out]
    for a, b in zip(got["1"], got["0"], strict=True):
        np.testing.assert_array_equal(a, b)
