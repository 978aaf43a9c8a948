"""The native kernels on bfloat16 operands (moejax.native): float32 arithmetic, each output rounded once to bfloat16.

On the widening variants (v4, v3, baseline) a bfloat16 call is exactly the float32 kernel on the widened operands
followed by XLA's convert to bfloat16 (round to nearest even), bit for bit: tested so. On the dot-product variants
(`native.BF16_DOT_ISAS`: vdpbf16ps, products of bfloat16 pairs accumulated in float32) the gemms are not the float32
kernel's bits; attention and argmax still are. Every variant against a float64 reference on the same bfloat16 inputs
within one bfloat16 rounding of the output (|got - want| <= 2^-8 |want|, plus 1e-5 of the output's largest magnitude
for the float32 accumulation of cancelling sums; the dot-product variants' MoE layer against a reference that rounds
its hidden activations to bfloat16, as they do). Then a bfloat16 model on the kernels against the XLA bfloat16 path
(MOEJAX_NATIVE=0) and a float32 model on the same rounded weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import native

from .test_native import _reference, needs_kernel

BF16 = jnp.bfloat16
RTOL = 2.0**-8  # one bfloat16 rounding of the output (round to nearest even: at most half of it, 2^-9)
NEAR_TIE = 0.05  # a greedy choice two bfloat16 paths may make differently: top-2 margin <= this x the logits' std


@pytest.fixture(params=list(native.ISAS))
def isa(request):
    """Each ISA variant this CPU runs, selected for one test."""
    if not native.available():
        pytest.skip(f"native kernel off or unavailable: {native.unavailable_reason()}")
    if request.param not in native.runnable_isas():
        pytest.skip(f"ISA variant {request.param!r} does not run on this CPU (it runs {native.runnable_isas()})")
    before = native.isa()
    native._select_isa(request.param)
    yield request.param
    native._select_isa(before)


def _bf16(rng, *shape, scale=0.3):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale, BF16)


def _f32(*arrays):
    return tuple(a.astype(jnp.float32) if a.dtype == BF16 else a for a in arrays)


def _assert_bits(got, want_f32, what=""):
    """got (bfloat16) is want_f32 rounded once to bfloat16 by XLA's convert, bit for bit."""
    assert got.dtype == BF16, (what, got.dtype)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want_f32.astype(BF16)).view(np.uint16),
                                  err_msg=what)


def _assert_close(got, want, what=""):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=1e-5 * (np.abs(want).max() + 1),
                               err_msg=what)


@needs_kernel
def test_matmul_is_the_float32_kernel_rounded_once(isa):
    """Decode (streamed weights) and prefill (packed panels) row counts, widths past the last whole vector (and
    past the last 32-column pair group), odd K, a traced layer of a stacked weight, one and all threads."""
    rng = np.random.default_rng(0)
    call = jax.jit(native.matmul, static_argnames="max_threads")
    for R, K, N in ((1, 96, 40), (9, 700, 33), (45, 257, 200), (70, 512, 640), (3, 5, 7), (40, 99, 250)):
        x, w = _bf16(rng, R, K), _bf16(rng, 3, K, N)
        want = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64)
        for threads in (1, 0):
            got = call(x, w, 2, max_threads=threads)
            if isa not in native.BF16_DOT_ISAS:
                _assert_bits(got, call(*_f32(x, w), 2, max_threads=threads), f"{R}x{K}x{N}")
            _assert_close(got, want, f"{R}x{K}x{N}")


def _round_to_bf16(h):
    """float64 values rounded to bfloat16 through float32 (what the dot-product variants multiply)."""
    return np.asarray(jnp.asarray(h, jnp.float32).astype(BF16), np.float64)


@needs_kernel
@pytest.mark.parametrize("L, E, D, F", [(1, 1, 8, 8), (2, 8, 40, 200), (2, 3, 128, 160), (1, 2, 37, 45)])
def test_moe_swiglu_is_the_float32_kernel_rounded_once(isa, L, E, D, F):
    """Ids outside [0, E) skipped (rows with no local route: zeros), few and many rows per expert, odd widths (an odd
    number of k pairs' last pair half empty on the dot-product variants)."""
    rng = np.random.default_rng(L * 1000 + F)
    w = (_bf16(rng, L, E, D, F), _bf16(rng, L, E, D, F), _bf16(rng, L, E, F, D))
    call = jax.jit(native.moe_swiglu, static_argnames="max_threads")
    for M in (1, 5, 17, 150):
        x = _bf16(rng, M, D, scale=1.0)
        local = jnp.asarray(rng.integers(-1, E + 2, (M, 2)), jnp.int32)
        gate = jnp.asarray(rng.random((M, 2)), jnp.float32)
        for threads in (1, 0):
            got = call(x, gate, local, *w, L - 1, max_threads=threads)
            if isa not in native.BF16_DOT_ISAS:
                _assert_bits(got, call(*_f32(x), gate, local, *_f32(*w), L - 1, max_threads=threads), f"M={M}")
        hidden = _round_to_bf16 if isa in native.BF16_DOT_ISAS else (lambda h: h)
        _assert_close(got, _reference(x, gate, local, *w, L - 1, hidden), f"M={M}")
        none_here = np.asarray((local < 0) | (local >= E)).all(axis=1)
        assert not np.asarray(got, np.float32)[none_here].any()


def _paged(rng, B=3, T=2, N=4, K=2, H=40, P=12, ps=8, MP=3):
    kp, vp = _bf16(rng, 2, P, ps, K, H, scale=1.0), _bf16(rng, 2, P, ps, K, H, scale=1.0)
    q = _bf16(rng, B, T, N, H, scale=1.0)
    table = jnp.asarray(rng.permutation(P)[:B * MP].reshape(B, MP), jnp.int32)
    pos = jnp.asarray([[4, 5], [20, 21], [0, -1]], jnp.int32)[:B]
    return q, kp, vp, table, pos


@needs_kernel
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_is_the_float32_kernel_rounded_once(window):
    """Against the float32 kernel (bits) and softmax attention in float64 on the gathered pages (tolerance);
    padding queries (position -1) give zeros."""
    rng = np.random.default_rng(1)
    q, kp, vp, table, pos = _paged(rng)
    got = native.paged_attention(q, kp, vp, 1, table, pos, window)
    _assert_bits(got, native.paged_attention(*_f32(q, kp, vp), 1, table, pos, window))
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, kp[1], vp[1]))
    table, pos = np.asarray(table), np.asarray(pos)
    B, T, N, H = q.shape
    G = N // kp.shape[3]
    want = np.zeros(q.shape)
    for b, t in np.ndindex(B, T):
        p = int(pos[b, t])
        if p < 0:
            continue  # padding: zeros
        keys = [s for s in range(p + 1) if window is None or p - s < window]
        for n in range(N):
            ks = np.stack([k64[table[b, s // 8], s % 8, n // G] for s in keys])
            vs = np.stack([v64[table[b, s // 8], s % 8, n // G] for s in keys])
            score = ks @ q64[b, t, n] / np.sqrt(H)
            prob = np.exp(score - score.max())
            want[b, t, n] = prob / prob.sum() @ vs
    _assert_close(got, want)
    assert not np.asarray(got, np.float32)[2, 1].any()  # padding


@needs_kernel
def test_paged_attention_refuses_a_page_id_outside_the_pool():
    q, kp, vp, table, pos = _paged(np.random.default_rng(2))
    with pytest.raises(Exception, match=r"page id 99 of row 1 \(page table entry 2\) outside the pool's \[0, 12\)"):
        jax.block_until_ready(native.paged_attention(q, kp, vp, 0, table.at[1, 2].set(99), pos))


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_argmax_on_ties_nan_and_inf():
    rng = np.random.default_rng(3)
    x = np.asarray(_bf16(rng, 6, 1001), np.float32)
    x[1, 999] = 9.0  # in the scalar tail
    x[2, [10, 500]] = 9.0  # a tie: the first
    x[3, [20, 30]] = np.nan, 9.0  # the first NaN
    x[4, 7] = np.inf
    x[5] = -np.inf
    x = jnp.asarray(x, BF16)
    index, finite = native.argmax(x)
    np.testing.assert_array_equal(index, jnp.argmax(x, axis=-1))
    np.testing.assert_array_equal(finite, [True, True, True, False, False, False])


@needs_kernel
def test_outputs_round_to_nearest_even_as_xla_converts():
    """x [R, 2] @ ones [2, 1]: each output the float32 sum of two bfloat16 values, rounded as XLA's convert does:
    ties to even (up and down), past the largest bfloat16 to inf, NaN and inf through."""
    big = float(jnp.finfo(BF16).max)
    pairs = [(1.0, 2.0**-8), (1.0, 3 * 2.0**-8), (1.5 + 2.0**-7, 2.0**-8), (-1.0, -(2.0**-8)), (1.0, 2.0**-9),
             (big, 2.0**119), (big, 2.0**118), (np.nan, 1.0), (np.inf, 1.0), (-np.inf, 0.0), (0.0, -0.0),
             (2.0**-126, 2.0**-133)]
    x = jnp.asarray(pairs, jnp.float32).astype(BF16)
    w = jnp.ones((2, 1), BF16)
    got = np.asarray(native.matmul(x, w)[:, 0], np.float32)
    want = np.asarray((x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(BF16)[:, 0], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[0] == 1.0 and got[1] == 1.0 + 2.0**-6 and got[5] == np.inf and got[6] == big


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_a_row_does_not_depend_on_the_others():
    rng = np.random.default_rng(4)
    D, F, E = 40, 200, 4
    w = (_bf16(rng, 1, E, D, F), _bf16(rng, 1, E, D, F), _bf16(rng, 1, E, F, D))
    x = _bf16(rng, 40, D, scale=1.0)
    local = jnp.asarray(rng.integers(0, E, (40, 2)), jnp.int32)
    gate = jnp.asarray(rng.random((40, 2)), jnp.float32)
    wm = _bf16(rng, D, 33)
    batch_moe, batch_mm = native.moe_swiglu(x, gate, local, *w, 0), native.matmul(x, wm)
    for m in (0, 17, 39):
        one = native.moe_swiglu(x[m:m + 1], gate[m:m + 1], local[m:m + 1], *w, 0)
        np.testing.assert_array_equal(np.asarray(one).view(np.uint16), np.asarray(batch_moe[m:m + 1]).view(np.uint16))
        one = native.matmul(x[m:m + 1], wm)
        np.testing.assert_array_equal(np.asarray(one).view(np.uint16), np.asarray(batch_mm[m:m + 1]).view(np.uint16))


@needs_kernel
def test_runs_takes_all_float32_or_all_bfloat16_and_the_kernels_refuse_a_mix():
    f, b = jnp.zeros((2, 8), jnp.float32), jnp.zeros((2, 8), BF16)
    assert native.runs(f, f) and native.runs(b, b)
    assert not native.runs(f, b) and not native.runs(b.astype(jnp.float16))
    with pytest.raises(Exception, match="matmul: x, w and y must be all float32 or all bfloat16"):
        jax.block_until_ready(native.matmul(f, jnp.zeros((8, 4), BF16)))


# ---- a bfloat16 model on the kernels ----

def _rounded_source(cfg, seed):
    from moejax.weights import RandomSource

    class Rounded(RandomSource):  # the bfloat16 model's weights, as float32
        def read(self, name, layer, index):
            return np.asarray(jnp.asarray(super().read(name, layer, index)).astype(BF16).astype(jnp.float32))

    return Rounded(cfg, seed)


def _per_position_error(got, want):
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


def _traced_kernels(monkeypatch, switch: str) -> dict:
    """Switch the kernels on ("1") or off ("0") with fresh traces, and count each kernel's bfloat16 calls traced
    from now on (the call sites reach them as `native.<kernel>`)."""
    monkeypatch.setenv(native.ENV, switch)
    jax.clear_caches()  # traces read the switch: none reused across paths
    calls = {}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + (args[0].dtype == BF16)
            return fn(*args, **kwargs)
        return counted

    for name in ("matmul", "moe_swiglu", "paged_attention", "argmax"):
        monkeypatch.setattr(native, name, counting(name, getattr(native, name)))
    return calls


@needs_kernel
def test_a_bfloat16_model_on_the_kernels_matches_the_xla_bfloat16_path(monkeypatch):
    """tiny-moe's forward in bfloat16 on the kernels (its projections and MoE layers) against MOEJAX_NATIVE=0
    (XLA's bfloat16 dots) and against a float32 model on the same rounded weights. Both bfloat16 paths round
    activations between ops (XLA at every op, the kernels once per kernel), so their logits differ from each
    other and from float32 by a few bfloat16 roundings compounded over 4 layers (~1% per position), more at the
    rare position where a rounding flips a token's top-2 experts; the kernels' path is no further from float32
    than XLA's, and the greedy next tokens are equal."""
    import moejax
    from moejax.weights import RandomSource

    cfg = moejax.load_model_config("tiny-moe")
    ids = np.array([list(range(7, 31)), list(range(100, 124)), [9] * 24], np.int32)
    logits = {}
    for name, switch, dtype, source in (("native", "1", "bfloat16", RandomSource(cfg, 3)),
                                        ("xla", "0", "bfloat16", RandomSource(cfg, 3)),
                                        ("float32", "1", "float32", _rounded_source(cfg, 3))):
        calls = _traced_kernels(monkeypatch, switch)
        logits[name] = moejax.Model(cfg, source, dtype=dtype).forward(ids).astype(np.float64)
        if name == "native":
            assert calls.get("matmul", 0) > 0 and calls.get("moe_swiglu", 0) > 0, calls
    native_logits, xla_logits, f32_logits = logits.values()
    np.testing.assert_array_equal(native_logits[:, -1].argmax(-1), xla_logits[:, -1].argmax(-1))
    assert np.median(_per_position_error(native_logits, f32_logits)) < 2**-6
    assert np.median(_per_position_error(native_logits, xla_logits)) < 2**-5
    assert np.linalg.norm(native_logits - f32_logits) <= 1.1 * np.linalg.norm(xla_logits - f32_logits)


@needs_kernel
@pytest.mark.slow  # compiles the XLA bfloat16 engine programs: ~20 s
def test_a_bfloat16_model_generates_the_xla_bfloat16_paths_greedy_tokens(monkeypatch, isa):
    """Greedy generation (prefill and decode over the paged cache, every kernel in bfloat16) gives the tokens of
    MOEJAX_NATIVE=0: all of them on the widening variants (the same float32 arithmetic on the same bfloat16 values
    as XLA's dots, rounded once). The dot-product variants multiply bfloat16 activations where the widening ones
    keep float32 intermediates, so a near-tie may go the other way: their tokens equal XLA's up to the first
    difference, and there XLA's own top-1 / top-2 logit margin is within NEAR_TIE of the logits' std."""
    import moejax

    cfg = moejax.load_model_config("tiny-moe")
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40)), [9] * 12]
    tokens = {}
    for switch in ("1", "0"):
        calls = _traced_kernels(monkeypatch, switch)
        tokens[switch] = moejax.Model.random(cfg, seed=3, dtype="bfloat16").generate(prompts, max_new_tokens=8)
        if switch == "1":
            assert all(calls.get(k, 0) > 0 for k in ("matmul", "moe_swiglu", "paged_attention", "argmax")), calls
    if isa not in native.BF16_DOT_ISAS:
        assert tokens["1"] == tokens["0"]
        return
    xla = moejax.Model.random(cfg, seed=3, dtype="bfloat16")  # MOEJAX_NATIVE=0 still set
    flips = 0
    for prompt, got, want in zip(prompts, tokens["1"], tokens["0"], strict=True):
        i = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if i is None:
            continue
        flips += 1
        logits = np.asarray(xla.forward(np.array([prompt + want[:i]], np.int32))[0, -1], np.float64)
        margin = logits[want[i]] - logits[got[i]]
        assert 0 <= margin <= NEAR_TIE * logits.std(), (prompt, i, margin, logits.std())
    assert flips < len(prompts), tokens  # not every sequence at a near-tie: the check is not vacuous


@pytest.mark.skipif(not native.available() or not native.has("moejax_write_rows"), reason="native kernels not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_rows_equals_scatter(dtype):
    """The KV-cache write kernel equals XLA's scatter with mode="drop", bit for bit, in place under donation."""
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.standard_normal((3, 5, 4, 2, 8)), dtype)
    rows = jnp.asarray(rng.standard_normal((6, 2, 8)), dtype)
    page = jnp.array([0, 4, 5, -1, 2, 4], jnp.int32)  # 5 and -1: outside [0, 5), dropped
    slot = jnp.array([3, 0, 1, 2, 3, 1], jnp.int32)
    want = pool.at[1, jnp.where((page >= 0) & (page < 5), page, 5), slot].set(rows, mode="drop")
    got = jax.jit(native.write_rows, donate_argnums=0)(jnp.array(pool), rows, 1, page, slot)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
