"""The Pallas paged-attention kernel (GPU's path), in Pallas' interpret mode on CPU, against dense causal attention
over each row's own positions, and its choice per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import attention
from moejax.model.paged_attention import paged_attention, supported


def _dense(q, k_pool, v_pool, layer, table, pos, window):
    """Per row and query: softmax over the row's own positions <= the query's (within the window), float64."""
    B, T, N, H = q.shape
    ps, K = k_pool.shape[2], k_pool.shape[3]
    G = N // K
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            p = pos[b, t]
            if p < 0:
                continue
            keys = [s for s in range(p + 1) if not window or p - s < window]
            pages, slots = table[b, [s // ps for s in keys]], [s % ps for s in keys]
            for n in range(N):
                kk = k_pool[layer, pages, slots, n // G].astype(np.float64)
                vv = v_pool[layer, pages, slots, n // G].astype(np.float64)
                s = kk @ q[b, t, n] / np.sqrt(H)
                w = np.exp(s - s.max())
                out[b, t, n] = (w / w.sum()) @ vv
    return out


def _case(rng, B, T, N, K, H, ps, MP, P=32, L=2):
    k_pool = rng.standard_normal((L, P, ps, K, H)).astype(np.float32)
    v_pool = rng.standard_normal((L, P, ps, K, H)).astype(np.float32)
    table = rng.permutation(P)[: B * MP].reshape(B, MP).astype(np.int32)  # rows own disjoint pages
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    return q, k_pool, v_pool, table


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("T", "G", "tile"), [(1, 1, None), (1, 4, None), (5, 2, None), (5, 2, 4)])
def test_kernel_equals_dense_attention_over_own_positions(T, G, tile, window):
    """Decode, GQA decode, a prefill chunk, and the chunk's 10 queries in tiles of 4 (the GPU's query tiling)."""
    rng = np.random.default_rng(T * 10 + G)
    B, K, H, ps, MP = 4, 2, 16, 4, 5
    q, k_pool, v_pool, table = _case(rng, B, T, K * G, K, H, ps, MP)
    starts = np.array([0, 3, 7, MP * ps - T])  # first page only, mid-page, page boundaries, the table's end
    pos = (starts[:, None] + np.arange(T)[None]).astype(np.int32)
    pos[1, T - 1:] = -1  # a padded tail
    out = jax.jit(lambda *a: paged_attention(*a, window=window, interpret=True, query_tile=tile))(
        jnp.asarray(q), (jnp.asarray(k_pool), jnp.asarray(v_pool)), jnp.int32(1), jnp.asarray(table), jnp.asarray(pos))
    out = np.asarray(out)
    ref = _dense(q, k_pool, v_pool, 1, table, pos, window)
    valid = pos >= 0
    np.testing.assert_allclose(out[valid], ref[valid], rtol=2e-5, atol=2e-5)
    assert not out[~valid].any()  # padding queries: zeros


def test_nan_in_slots_a_row_does_not_own_never_reaches_it():
    """Pages past a row's last position, and the unused slots of its last page, hold NaN (stale, another's)."""
    rng = np.random.default_rng(0)
    q, k_pool, v_pool, table = _case(rng, 3, 1, 4, 2, 16, 4, 4)
    pos = np.array([[5], [0], [-1]], np.int32)  # row 0 owns slots 0..5 (page 1 half), row 1 one slot, row 2 none
    for b, last in ((0, 5), (1, 0)):
        for s in range(last + 1, 16):
            k_pool[1, table[b, s // 4], s % 4] = np.nan
            v_pool[1, table[b, s // 4], s % 4] = np.nan
    k_pool[1, table[2]] = np.nan  # the padding row's pages
    out = np.asarray(jax.jit(lambda *a: paged_attention(*a, interpret=True))(
        jnp.asarray(q), (jnp.asarray(k_pool), jnp.asarray(v_pool)), 1, jnp.asarray(table), jnp.asarray(pos)))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:2], _dense(q, k_pool, v_pool, 1, table, pos, None)[:2], rtol=2e-5, atol=2e-5)


def test_bfloat16_pools():
    rng = np.random.default_rng(1)
    q, k_pool, v_pool, table = _case(rng, 2, 2, 4, 2, 16, 4, 3)
    pos = np.array([[4, 5], [9, 10]], np.int32)
    cast = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out = jax.jit(lambda *a: paged_attention(*a, interpret=True))(cast(q), (cast(k_pool), cast(v_pool)), 0,
                                                                  jnp.asarray(table), jnp.asarray(pos))
    assert out.dtype == jnp.bfloat16
    ref = _dense(q, k_pool, v_pool, 0, table, pos, None)
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 3e-2


def test_the_choice_per_platform():
    pool = (2, 64, 16, 4, 128)
    assert attention.choose_paged_attention("gpu", False, pool) == "pallas"
    assert attention.choose_paged_attention("gpu", False, (2, 64, 4, 4, 128)) == "xla"  # pages under 16 slots
    assert attention.choose_paged_attention("cpu", True, pool) == "native"
    assert attention.choose_paged_attention("cpu", False, pool) == "xla"
    assert supported(16, 64) and not supported(16, 96) and not supported(8, 128)


def test_xla_path_never_reads_or_writes_another_page_for_a_bad_page_id():
    """The XLA path's answer to a page id outside [0, pages): nothing written (a negative id does not wrap onto
    the last page), NaN read (never another page's values), so the row's logits go non-finite and the engine
    ends that request with an error; the native kernel refuses the call (tests/test_native.py)."""
    L, P, ps, K, H = 1, 4, 2, 1, 2
    pool = jnp.arange(L * P * ps * K * H, dtype=jnp.float32).reshape(L, P, ps, K, H)
    new = jnp.full((1, 1, K, H), -7.0)
    for bad in (-1, P, 2**20):
        table = jnp.array([[bad]], jnp.int32)
        written = attention.write_pages(pool, 0, new, jnp.array([[0]], jnp.int32), table)
        np.testing.assert_array_equal(np.asarray(written), np.asarray(pool))
        assert np.isnan(np.asarray(attention._gather_pages(pool, 0, table))).all()
    good = attention._gather_pages(pool, 0, jnp.array([[2, 0]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(good)[0, :ps], np.asarray(pool)[0, 2])
