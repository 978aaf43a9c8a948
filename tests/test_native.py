"""The native kernels (moejax.native) against float64 references and the XLA paths they replace.

Skipped where the library was not built or does not load (the XLA path is then the only one, and the
rest of the suite covers it). CI runs the suite with the kernel (the default) and the MoE tests again with
MOEJAX_NATIVE=0; the engine comparisons here set the switch in their own subprocesses. The kernel tests take
the `isa` fixture: they run once per ISA variant this CPU runs (AVX-512, AVX2, baseline on an AVX-512 host),
each selected in-process for the test; tests/test_native_isa.py compares the variants with each other and
checks the MOEJAX_NATIVE_ISA switch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import native
from moejax.model import moe

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel off or unavailable: MOEJAX_NATIVE="
                                         f"{os.environ.get(native.ENV, '')!r}, {native.unavailable_reason()}")


# The float32 kernels of every variant but the bf16 dot-product ones, which run v4's float32 and int8 kernels (the
# same functions: kernels.cc's k_avx512bf16).
FLOAT32_ISAS = [name for name in native.ISAS if name not in native.BF16_DOT_ISAS]


@pytest.fixture(params=FLOAT32_ISAS)
def isa(request):
    """Each ISA variant, selected for one test (the process's own variant again after it); a variant this CPU
    cannot run is skipped, saying so (CI covers it only on a host that runs it)."""
    if not native.available():
        pytest.skip(f"native kernel off or unavailable: {native.unavailable_reason()}")
    if request.param not in native.runnable_isas():
        pytest.skip(f"ISA variant {request.param!r} does not run on this CPU (it runs {native.runnable_isas()})")
    before = native.isa()
    native._select_isa(request.param)
    yield request.param
    native._select_isa(before)


def _reference(x, gate, local, wg, wu, wd, layer, hidden=lambda h: h):
    """Sum over routes of gate * SwiGLU_e(x) for local ids e in [0, E), in float64 numpy; `hidden` applied to the
    hidden activations silu(x wg) * (x wu) before the down projection (e.g. a rounding)."""
    x, gate, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, gate, wg, wu, wd))
    y = np.zeros_like(x)
    for m, k in np.ndindex(*local.shape):
        e = int(local[m, k])
        if 0 <= e < wg.shape[1]:
            g = x[m] @ wg[layer, e]
            y[m] += gate[m, k] * (hidden(g / (1 + np.exp(-g)) * (x[m] @ wu[layer, e])) @ wd[layer, e])
    return y


def _weights(rng, L, E, D, F):
    wg, wu = (jnp.asarray(rng.standard_normal((L, E, D, F), np.float32) * 0.2) for _ in range(2))
    return wg, wu, jnp.asarray(rng.standard_normal((L, E, F, D), np.float32) * 0.2)


@needs_kernel
@pytest.mark.parametrize("L, E, D, F", [(1, 1, 8, 8), (3, 4, 64, 96), (2, 8, 40, 200), (2, 3, 128, 1000),
                                        (1, 2, 600, 20)])
@pytest.mark.usefixtures("isa")
def test_kernel_equals_reference(L, E, D, F):
    """Any row count (tile and tail paths), ids outside [0, E) skipped, every layer, 1 and all threads."""
    rng = np.random.default_rng(L * 1000 + F)
    w = _weights(rng, L, E, D, F)
    call = jax.jit(native.moe_swiglu, static_argnames="max_threads")
    for M in (1, 2, 5, 9, 17, 70, 150):  # 150: above 32 rows per expert for the smaller E (packed panels)
        x = jnp.asarray(rng.standard_normal((M, D), np.float32))
        local = jnp.asarray(rng.integers(-1, E + 2, (M, 2)), jnp.int32)
        gate = jnp.asarray(rng.random((M, 2)), jnp.float32)
        for layer in sorted({0, L - 1}):
            want = _reference(x, gate, local, *w, layer)
            for threads in (1, 0):
                got = call(x, gate, local, *w, layer, max_threads=threads)
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * (np.abs(want).max() + 1))


@needs_kernel
@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("D, F", [(64, 160), (40, 200)])  # (40, 200): widths past the last whole vector
def test_a_row_does_not_depend_on_the_others(D, F):
    """Bitwise, within one ISA variant: a row's output alone equals it inside any batch and on one thread
    or all (the engine's busy-vs-alone exactness: alone, the few-row path and wide column chunks; in the
    batch, ~50 rows per expert, the packed-panel path and other chunks); a NaN row stays in its own row."""
    rng = np.random.default_rng(5)
    L, E = 2, 8
    w = _weights(rng, L, E, D, F)
    call = jax.jit(native.moe_swiglu, static_argnames="max_threads")
    x = rng.standard_normal((200, D)).astype(np.float32)
    local = rng.integers(0, E, (200, 2)).astype(np.int32)
    gate = rng.random((200, 2)).astype(np.float32)
    alone = np.asarray(call(x[3:4], gate[3:4], local[3:4], *w, 1))
    x[7] = np.nan
    for threads in (0, 1):
        busy = np.asarray(call(x, gate, local, *w, 1, max_threads=threads))
        np.testing.assert_array_equal(busy[3:4], alone)
        np.testing.assert_array_equal(np.asarray(call(x[:9], gate[:9], local[:9], *w, 1, max_threads=threads)),
                                      busy[:9])
        assert np.isnan(busy[7]).all() and np.isfinite(np.delete(busy, 7, axis=0)).all()


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_kernel_inside_a_loop_with_a_traced_layer():
    rng = np.random.default_rng(0)
    L, E, D, F, M = 3, 4, 32, 48, 6
    w = _weights(rng, L, E, D, F)
    x = jnp.asarray(rng.standard_normal((M, D), np.float32))
    local = jnp.asarray(rng.integers(0, E, (M, 2)), jnp.int32)
    gate = jnp.full((M, 2), 0.5, jnp.float32)
    body = lambda i, x: x + 0.1 * native.moe_swiglu(x, gate, local, *w, i)  # noqa: E731
    got = jax.jit(lambda x: jax.lax.fori_loop(0, L, body, x))(x)
    want = np.asarray(x, np.float64)
    for layer in range(L):
        want = want + 0.1 * _reference(want.astype(np.float32), gate, local, *w, layer)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_argmax_matches_jnp_argmax_on_ties_nan_and_inf():
    from moejax.model.layers import argmax

    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 50)).astype(np.float32)
    x[1, [7, 9]] = np.nan  # first NaN wins
    x[2] = -np.inf  # all masked: index 0
    x[3, [4, 8]] = 10.0  # tie: first maximum
    x[4, 3] = np.inf
    x[5] = np.nan
    x[6, 49] = 99.0
    got = np.asarray(jax.jit(argmax)(x))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert got.dtype == np.int32 and got.tolist() == [int(np.argmax(x[0])), 7, 0, 4, 3, 0, 49]


@needs_kernel
@pytest.mark.parametrize("V", [50, 1000, 4099])
@pytest.mark.usefixtures("isa")
def test_argmax_and_finite_per_row_on_a_sharded_batch(V):
    """The native pass (vector body and scalar tail) gives jnp.argmax and the finiteness flag, also when
    the rows are split over a mesh axis (it runs per shard: a custom call has no sharding rule)."""
    from moejax.model.layers import argmax_and_finite

    rng = np.random.default_rng(V)
    x = rng.standard_normal((8, V)).astype(np.float32)
    x[1, V - 1] = np.nan  # in the tail
    x[2, V // 2] = np.inf
    x[3, [V - 3, V - 2]] = 50.0  # tie near the end
    x[4, 5] = -np.inf  # non-finite, not the maximum
    want_i, want_f = np.asarray(jnp.argmax(x, axis=-1)), np.isfinite(x).all(axis=-1)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data", None)))
        got_i, got_f = jax.jit(argmax_and_finite)(xs)
        assert jax.typeof(got_i).sharding.spec == jax.P("data")
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_f), want_f)
    assert want_f.tolist() == [True, False, False, True, False, True, True, True]


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_matmul_equals_numpy():
    rng = np.random.default_rng(1)
    # few rows (at most 32: streamed in place, 32 the last); packed panels (above 32 rows) with tail
    # columns only, whole panels + tail, a partial last panel, K blocks with a remainder, row tiles
    # split unevenly
    for R, K, N in ((1, 8, 8), (3, 64, 2000), (9, 700, 33), (32, 512, 1030), (40, 700, 33), (33, 512, 1030),
                    (45, 700, 200), (50, 257, 130)):
        x, w = rng.standard_normal((R, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
        want = x.astype(np.float64) @ w
        np.testing.assert_allclose(jax.jit(native.matmul)(x, w), want, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_matmul_row_does_not_depend_on_the_others():
    """Bitwise, within one ISA variant: rows alone, among few rows (streamed weights) and among many (packed
    panels), on one thread or all, give the same bits, in whole vectors and in the columns past them."""
    rng = np.random.default_rng(2)
    call = jax.jit(native.matmul, static_argnames="max_threads")
    for K, N in ((700, 33), (257, 200), (512, 1030)):
        x, w = rng.standard_normal((40, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
        many = np.asarray(call(x, w))
        for rows in (slice(3, 4), slice(0, 9), slice(0, 32)):
            np.testing.assert_array_equal(np.asarray(call(x[rows], w)), many[rows])
        np.testing.assert_array_equal(np.asarray(call(x, w, max_threads=1)), many)


def _compiled_dispatch_text():
    rng = np.random.default_rng(0)
    E, D, F, M = 4, 16, 24, 3
    x = rng.standard_normal((M, D)).astype(np.float32)
    w = tuple(rng.standard_normal(s).astype(np.float32) for s in ((2, E, D, F), (2, E, D, F), (2, E, F, D)))
    weights, experts = rng.random((M, 2)).astype(np.float32), np.array([[0, 1], [1, 2], [0, 3]], np.int32)
    fn = jax.jit(lambda x, we, ex, w: moe.local_dispatch(x, we, ex, w, 1))  # a fresh trace per call
    return fn.lower(x, weights, experts, w).as_text()


def test_xla_path_when_switched_off(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available() and not native.enabled()
    assert "moejax_moe_swiglu" not in _compiled_dispatch_text()


@needs_kernel
def test_kernel_path_when_available(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    assert "moejax_moe_swiglu" in _compiled_dispatch_text()


_GENERATE = """
import json, sys, moejax
from moejax import native
cfg = moejax.load_model_config("tiny-moe")
prompts = [[1, 2, 3, 4, 5], list(range(7, 40)), [9] * 12, list(range(100, 117))]
out = {}
for layout in sys.argv[1:]:
    model = moejax.Model.random(cfg, seed=3, layout=layout)
    engine = moejax.Engine(model, moejax.ServeConfig(max_running=4, max_model_len=64, chunk_size=16, seed=0))
    out[layout] = engine.generate(prompts, moejax.SamplingParams(max_new_tokens=12))
    out[layout + " generate"] = model.generate(prompts, max_new_tokens=12)
print(json.dumps({"native": native.available(), "tokens": out}))
"""


def _generate(switch: str, layout: str) -> dict:
    env = dict(os.environ, **{native.ENV: switch})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    out = subprocess.run([sys.executable, "-c", _GENERATE, layout], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_kernel
@pytest.mark.parametrize("layout", ["DP1", pytest.param("DP2TP2EP2", marks=pytest.mark.slow)])  # DP2TP2EP2: slow step
def test_engine_greedy_tokens_identical_on_both_paths(layout):
    xla, kernel = _generate("0", layout), _generate("1", layout)
    assert (xla["native"], kernel["native"]) == (False, True)
    assert kernel["tokens"] == xla["tokens"]


@needs_kernel
def test_gemm_bench_times_the_kernel(capsys):
    from moejax.bench import gemm

    assert gemm.main(["--model", "tiny-moe", "--rows", "1,3", "--weight-mb", "0.5", "--native"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("MoE layer"))) + 2:]
    assert [line.split()[0] for line in table] == ["1", "3"]
    assert all(line.split()[-2].endswith("x") for line in table)


@needs_kernel
def test_project_reads_the_layer_in_place_and_equals_the_xla_path(monkeypatch):
    """layers.project on the native kernel equals XLA's dot on the sliced layer (traced layer, 1 and 2
    contracted axes), and the native program has no dynamic slice of the stacked weight."""
    from moejax.model.layers import project

    rng = np.random.default_rng(4)
    w3 = jnp.asarray(rng.standard_normal((3, 24, 5, 8)), jnp.float32)  # [L, D, N, H]
    w4 = jnp.asarray(rng.standard_normal((3, 5, 8, 24)), jnp.float32)  # [L, N, H, D]
    x = jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32)
    o = jnp.asarray(rng.standard_normal((2, 3, 5, 8)), jnp.float32)

    def both(layer):
        return project(x, w3, layer), project(o, w4, layer, contract=2)

    fn = jax.jit(both)
    native_out, text = fn(1), fn.lower(1).compile().as_text()
    monkeypatch.setenv(native.ENV, "0")
    xla_out = jax.jit(both)(1)
    assert "dynamic-slice" not in text and "moejax_matmul" in text
    for a, b, want in zip(native_out, xla_out, (jnp.einsum("BTD,DNH->BTNH", x, w3[1]),
                                                  jnp.einsum("BTNH,NHD->BTD", o, w4[1])), strict=True):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_project_runs_the_kernel_at_any_row_count():
    """Few rows (decode: streamed weights) and many (prefill: packed panels) both run the kernel on the
    traced layer's weight and equal the float64 product."""
    from moejax.model import layers

    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((2, 96, 200)), jnp.float32)
    fn = jax.jit(lambda x_, layer: layers.project(x_, w, layer))
    for rows in (3, 64, 300):
        x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
        assert "moejax_matmul" in fn.lower(x, 1).compile().as_text(), rows
        want = np.asarray(x, np.float64) @ np.asarray(w[1], np.float64)
        np.testing.assert_allclose(fn(x, 1), want, rtol=1e-4, atol=1e-4 * np.sqrt(96))


def _gathered_attention(q, k_pool, v_pool, layer, table, pos, window):
    """The XLA path: gather the row's whole page window, zero the slots past its last position."""
    from moejax.model import attention

    k, v = (attention._gather_pages(pool, layer, table) for pool in (k_pool, v_pool))
    kpos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
    owned = kpos <= jnp.max(pos, axis=1, keepdims=True)
    k, v = (jnp.where(owned[..., None, None], a, 0) for a in (k, v))
    return attention.attend(q, k, v, pos, kpos, window)


def _paged_case(rng, B, T, N, K, H, L, P, ps, MP):
    """Pools of random values, each row its own MP distinct pages, each row 1..T queries at consecutive
    positions starting anywhere in its window (the rest padding, position -1)."""
    k_pool, v_pool = (rng.standard_normal((L, P, ps, K, H)).astype(np.float32) for _ in range(2))
    pages = rng.permutation(P)[:B * MP].reshape(B, MP)
    pos = np.full((B, T), -1, np.int32)
    for b in range(B):
        n = int(rng.integers(1, T + 1))
        start = int(rng.integers(0, MP * ps - n + 1))
        pos[b, :n] = np.arange(start, start + n)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    return q, k_pool, v_pool, pages.astype(np.int32), pos


@needs_kernel
@pytest.mark.parametrize("B, T, N, K, H, P, ps, MP, window", [
    (3, 1, 8, 2, 64, 20, 16, 4, None),  # decode, GQA 4:1
    (2, 5, 4, 4, 20, 16, 4, 6, None),  # chunk, no grouping, head_dim not a multiple of 16
    (4, 7, 6, 2, 33, 30, 8, 5, 5),  # sliding window shorter than the chunk
    (1, 32, 8, 2, 64, 8, 16, 3, None),  # a prefill chunk
])
@pytest.mark.usefixtures("isa")
def test_paged_attention_equals_the_gathered_xla_path(B, T, N, K, H, P, ps, MP, window):
    rng = np.random.default_rng(B * 100 + T)
    q, k_pool, v_pool, table, pos = _paged_case(rng, B, T, N, K, H, 2, P, ps, MP)
    call = jax.jit(native.paged_attention, static_argnames=("window", "max_threads"))
    valid = pos >= 0
    for layer in (0, 1):
        want = np.asarray(_gathered_attention(q, k_pool, v_pool, layer, table, pos, window))
        for threads in (1, 0):
            got = np.asarray(call(q, k_pool, v_pool, layer, table, pos, window=window, max_threads=threads))
            np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
            assert not got[~valid].any()  # padding queries: zeros


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_paged_attention_row_does_not_depend_on_the_others():
    """Bitwise, within one ISA variant: a row's output alone equals it in a batch, on one thread or all."""
    rng = np.random.default_rng(8)
    q, k_pool, v_pool, table, pos = _paged_case(rng, 4, 3, 8, 2, 40, 2, 24, 8, 5)
    call = jax.jit(native.paged_attention, static_argnames=("window", "max_threads"))
    busy = np.asarray(call(q, k_pool, v_pool, 1, table, pos))
    np.testing.assert_array_equal(np.asarray(call(q, k_pool, v_pool, 1, table, pos, max_threads=1)), busy)
    for b in range(4):
        one = slice(b, b + 1)
        np.testing.assert_array_equal(np.asarray(call(q[one], k_pool, v_pool, 1, table[one], pos[one])), busy[one])


@needs_kernel
def test_paged_attention_refuses_a_page_id_outside_the_pool():
    """A page id the queries would read outside [0, P) is an error naming the row, the entry and the id (not
    clamped onto another row's page); an entry past the row's last position is not read, so not checked."""
    rng = np.random.default_rng(9)
    q, k_pool, v_pool, table, pos = _paged_case(rng, 3, 1, 4, 2, 16, 1, 12, 4, 3)
    pos[:] = [[5], [9], [2]]  # row 1 reads entries 0-2, row 2 entry 0 only
    call = jax.jit(native.paged_attention)
    for bad, entry in ((12, 2), (-1, 0), (1 << 30, 1)):
        broken = table.copy()
        broken[1, entry] = bad
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=rf"page id {bad} of row 1 \(page table entry {entry}\) outside the pool's \[0, 12\)"):
            np.asarray(call(q, k_pool, v_pool, 0, broken, pos))
    unread = table.copy()
    unread[2, 1:] = [99, -5]
    np.testing.assert_array_equal(np.asarray(call(q, k_pool, v_pool, 0, unread, pos)),
                                  np.asarray(call(q, k_pool, v_pool, 0, table, pos)))


@needs_kernel
@pytest.mark.usefixtures("isa")
def test_paged_attention_reads_nothing_past_a_query_position():
    """NaN in every slot a query may not see (its own later slots, the rest of its pages, others' pages)
    leaves its output finite and unchanged: isolation holds without any masking copy."""
    rng = np.random.default_rng(7)
    q, k_pool, v_pool, table, pos = _paged_case(rng, 3, 4, 4, 2, 16, 1, 12, 4, 3)
    clean = np.asarray(native.paged_attention(q, k_pool, v_pool, 0, table, pos))
    last = pos.max(axis=1)
    k_bad, v_bad = k_pool.copy(), v_pool.copy()
    seen = np.zeros((12, 4), bool)
    for b in range(3):
        for s in range(last[b] + 1):
            seen[table[b, s // 4], s % 4] = True
    k_bad[:, ~seen], v_bad[:, ~seen] = np.nan, np.nan
    assert (~seen).sum() > 4
    got = np.asarray(native.paged_attention(q, k_bad, v_bad, 0, table, pos))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, clean)


@needs_kernel
def test_sampling_runs_the_greedy_argmax_once():
    """The engine's sampling asks for the greedy ids (in `sample`) and the finiteness flag (in batch.py)
    of the same logits; XLA merges the two identical native calls into one pass (the claim in
    batch._sample_rows). The other call in the program is the seeded draw's argmax."""
    from moejax.engine import batch

    B, V, T, P = 4, 100, 1, 2
    logits = jnp.asarray(np.random.default_rng(6).standard_normal((B, V)), jnp.float32)
    packed = jnp.asarray(batch.padding(B, T, P))
    fn = jax.jit(batch._sample_rows, static_argnums=2)
    assert fn.lower(logits, packed, T).compile().as_text().count('custom_call_target="moejax_argmax"') == 2
    np.testing.assert_array_equal(fn(logits, packed, T), np.argmax(np.asarray(logits), axis=-1))
