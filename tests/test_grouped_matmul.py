"""The Pallas grouped-matmul kernels of the "pallas" MoE strategy, in Pallas' interpret mode on CPU, against a
per-token, per-expert loop (the GPU program they compile to is checked by the gpu_compile tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import grouped_matmul as gm


def _naive(x, gate, local, wg, wu, wd, layer):
    out = np.zeros(x.shape, np.float64)
    for m in range(x.shape[0]):
        for g, e in zip(gate[m], local[m], strict=True):
            if 0 <= e < wg.shape[1]:
                a, b = x[m] @ wg[layer, e], x[m] @ wu[layer, e]
                out[m] += g * ((a / (1 + np.exp(-a)) * b) @ wd[layer, e])
    return out


def _weights(rng, L, El, D, F, dtype=np.float32):
    wg, wu = (rng.standard_normal((L, El, D, F)) * 0.2 for _ in range(2))
    wd = rng.standard_normal((L, El, F, D)) * 0.2
    return tuple(np.asarray(w, dtype) for w in (wg, wu, wd))


@pytest.mark.parametrize(("M", "X", "El", "D", "F", "block"), [
    (1, 1, 4, 32, 64, None),  # decode, one pair
    (5, 2, 4, 32, 64, None),
    (37, 3, 8, 48, 80, 16),  # widths that are not powers of two; many partial blocks
    (64, 2, 3, 16, 32, 64),  # a block wider than any expert's rows
])
def test_kernels_equal_the_per_expert_loop(M, X, El, D, F, block):
    rng = np.random.default_rng(M)
    w = _weights(rng, 3, El, D, F)
    x = rng.standard_normal((M, D)).astype(np.float32)
    gate = rng.random((M, X)).astype(np.float32)
    local = rng.integers(-1, El + 2, (M, X)).astype(np.int32)  # ids outside [0, El) belong to other shards
    local[0, 0] = 0  # at least one pair here
    fn = jax.jit(lambda *a: gm.moe_swiglu(*a, interpret=True, block=block))
    for layer in (0, 2):  # a traced layer index selects the weights in place
        y = np.asarray(fn(x, gate, local, w, jnp.int32(layer)))
        np.testing.assert_allclose(y, _naive(x, gate, local, *w, layer), rtol=1e-5, atol=1e-5)


def test_an_expert_with_every_token_and_experts_with_none():
    rng = np.random.default_rng(1)
    M, El, D, F = 40, 6, 32, 32
    w = _weights(rng, 1, El, D, F)
    x = rng.standard_normal((M, D)).astype(np.float32)
    local = np.stack([np.full(M, 2), np.where(np.arange(M) % 2, 4, 2)], axis=1).astype(np.int32)  # 2: every token
    local[:, 1] = np.where(local[:, 1] == 2, 4, local[:, 1])
    gate = rng.random((M, 2)).astype(np.float32)
    y = np.asarray(jax.jit(lambda *a: gm.moe_swiglu(*a, interpret=True))(x, gate, local, w, 0))
    np.testing.assert_allclose(y, _naive(x, gate, local, *w, 0), rtol=1e-5, atol=1e-5)


def test_bfloat16_is_close_to_the_float32_loop():
    rng = np.random.default_rng(2)
    M, X, El, D, F = 24, 2, 4, 64, 64
    w = _weights(rng, 1, El, D, F)
    x = rng.standard_normal((M, D)).astype(np.float32)
    gate = rng.random((M, X)).astype(np.float32)
    local = rng.integers(0, El, (M, X)).astype(np.int32)
    cast = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    y = jax.jit(lambda *a: gm.moe_swiglu(*a, interpret=True))(cast(x), gate, local, tuple(map(cast, w)), 0)
    assert y.dtype == jnp.bfloat16
    ref = _naive(x, gate, local, *w, 0)
    assert np.abs(np.asarray(y, np.float32) - ref).max() <= 2e-2 * np.abs(ref).max()


def test_block_layout_holds_one_expert_per_block_and_bounds_the_rows():
    rng = np.random.default_rng(3)
    M, X, El, block = 200, 4, 16, 16
    local = rng.integers(0, El + 4, (M, X)).astype(np.int32)
    dest, token, order, block_expert = (np.asarray(a) for a in gm.block_layout(jnp.asarray(local), El, block))
    N = M * X
    here = (local.reshape(-1) < El)[order]
    assert len(block_expert) == min(N, -(-N // block) + El)
    rows = dest[here]
    assert len(set(rows.tolist())) == here.sum()  # each pair its own row
    assert (block_expert[rows // block] == local.reshape(-1)[order][here]).all()  # a block holds its expert only
    assert (token == order // X).all()
    used = -(-np.bincount(local[local < El], minlength=El) // block)
    assert (block_expert[: used.sum()] < El).all() and (block_expert[used.sum():] == El).all()


@pytest.mark.parametrize(("pairs", "El", "want"), [(8, 128, 16), (32768, 128, 64), (8192, 128, 16),
                                                   (16384, 128, 32), (4096, 8, 64), (1000, 16, 16)])
def test_choose_block(pairs, El, want):
    assert gm.choose_block(pairs, El) == want


@pytest.mark.parametrize("tokens", [1024, 2048, 4096, 16384])
def test_prefill_rows_stay_within_1_3x_the_routed_pairs(tokens):
    """The static rows the kernels may compute for a Qwen3-30B-A3B layer (128 experts, top-8) from 1024 tokens
    (8192 pairs, 64 per expert) up; below ~50 pairs per expert a block of 16 rows bounds it above 1.3x."""
    pairs, El = tokens * 8, 128
    block = gm.choose_block(pairs, El)
    rows = min(pairs, -(-pairs // block) + El) * block
    assert rows <= 1.3 * pairs


def test_supported_widths():
    assert gm.supported(2048, 768) and gm.supported(4096, 14336 // 8)
    assert not gm.supported(16, 12) and not gm.supported(2048, 6)


@pytest.mark.parametrize(("layout", "mode"), [pytest.param("TP2EP4", "dp_attention", marks=pytest.mark.slow),
                                            ("DP2TP2EP2", "replicated_attention")])  # the first in CI's slow step
def test_a_model_on_the_pallas_strategy_equals_the_loop(layout, mode):
    """The whole model (both expert modes, experts and FFN split) on the kernels == on the "loop" strategy."""
    import moejax

    cfg = moejax.load_model_config("tiny-moe").replace(num_layers=2)
    prompts = [[1, 5, 9, 13, 17], [3, 4]]
    runs = {s: moejax.Model.random(cfg, layout=layout, moe_strategy=s, expert_mode=mode) for s in ("pallas", "loop")}
    logits = {s: m.forward([prompts[0]]) for s, m in runs.items()}
    np.testing.assert_allclose(logits["pallas"], logits["loop"], rtol=1e-5, atol=1e-5)
    assert runs["pallas"].generate(prompts, max_new_tokens=4) == runs["loop"].generate(prompts, max_new_tokens=4)
