"""The MoE layer against a naive per-token, per-expert loop, for every dispatch strategy and EP/TP split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import manual, native
from moejax.mesh import Layout, make_mesh
from moejax.model import moe
from moejax.sharding import Parallelism

E, D, F, X = 8, 16, 12, 2
# Every strategy; "native" where the kernels are built and on (CI runs this file with them off too).
STRATEGIES = ["loop", "gather", "blocks", "ragged", "pallas"] + (["native"] if native.available() else [])


def _naive(x_MD, weights_MX, experts_MX, wg, wu, wd):
    out = np.zeros_like(x_MD)
    for m in range(x_MD.shape[0]):
        for w, e in zip(weights_MX[m], experts_MX[m], strict=True):
            h = (x_MD[m] @ wg[e]) / (1 + np.exp(-(x_MD[m] @ wg[e]))) * (x_MD[m] @ wu[e])
            out[m] += w * (h @ wd[e])
    return out


def _routing(M, rng, skip_expert=3):
    """Random routing over X distinct experts per token; `skip_expert` gets no token; expert 0 gets every token."""
    experts = np.zeros((M, X), np.int32)
    for m in range(M):
        others = [e for e in range(1, E) if e != skip_expert]
        experts[m] = [0, rng.choice(others)]
    weights = rng.random((M, X)).astype(np.float32)
    return weights, experts


def _run_dispatch(layout, strategy, x, weights, experts, wg, wu, wd, **kwargs):
    """moe.dispatch inside a shard_map over `layout` (experts over `expert`, F over `tensor`), reduced."""
    mesh = make_mesh(Layout.parse(layout))
    par = Parallelism(layout, "replicated_attention", strategy)
    w_spec = par.spec(("experts", "embed", "ffn"))
    wd_spec = par.spec(("experts", "ffn", "embed"))
    rep = jax.sharding.PartitionSpec()

    def body(x_, w_, e_, wg_, wu_, wd_):
        y_ = moe.dispatch(x_, w_, e_, (wg_, wu_, wd_), par, **kwargs)
        return par.psum(y_, "experts", "ffn")

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, rep, w_spec, w_spec, wd_spec), out_specs=rep,
                               check_vma=manual.checks_replication("cpu", strategy)))
    put = lambda a, spec: jax.device_put(np.asarray(a), jax.NamedSharding(mesh, spec))  # noqa: E731
    return np.asarray(fn(put(x, rep), put(weights, rep), put(experts, rep), put(wg, w_spec), put(wu, w_spec),
                         put(wd, wd_spec)))


# Every strategy on every layout at 40 rows; at 3 and 300 rows on DP1 and TP2EP4 in the default suite, on EP4 and
# EP8 in CI's slow step.
SIZES = [pytest.param(M, layout, marks=() if M == 40 or layout in ("DP1", "TP2EP4") else pytest.mark.slow)
         for M in (3, 40, 300) for layout in ("DP1", "EP4", "TP2EP4", "EP8")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("M", "layout"), SIZES)
def test_dispatch_equals_naive_loop(strategy, layout, M):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, D)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    weights, experts = _routing(M, rng)
    ref = _naive(x, weights, experts, wg, wu, wd)

    out = _run_dispatch(layout, strategy, x, weights, experts, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tokens_routed_to_no_expert_cost_nothing(strategy):
    """Expert id -1 (how the MoE layer marks batch padding) gives a zero output; other rows are unchanged."""
    rng = np.random.default_rng(2)
    M = 12
    x = rng.standard_normal((M, D)).astype(np.float32)
    w = tuple(rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((E, D, F), (E, D, F), (E, F, D)))
    weights, experts = _routing(M, rng)
    padding = np.arange(M) % 3 == 0
    experts[padding] = -1
    out = _run_dispatch("EP4", strategy, x, weights, experts, *w)
    assert not out[padding].any()
    ref = _naive(x[~padding], weights[~padding], experts[~padding], *w)
    np.testing.assert_allclose(out[~padding], ref, atol=1e-5, rtol=1e-5)


def test_row_caps_are_powers_of_two_then_all_rows_and_bounded():
    assert moe.row_caps(1) == [1]
    assert moe.row_caps(8) == [1, 2, 4, 8]
    assert moe.row_caps(40) == [1, 2, 4, 8, 16, 32, 40]
    assert moe.row_caps(300) == [4, 8, 16, 32, 64, 128, 256, 300]
    assert moe.row_caps(300, max_caps=2) == [256, 300]


def test_unknown_strategy_is_rejected():
    z = np.zeros((E, D, F), np.float32)
    with pytest.raises(ValueError, match="unknown MoE dispatch strategy 'dense'"):
        _run_dispatch("DP1", "dense", np.zeros((2, D), np.float32), np.zeros((2, X), np.float32),
                      np.zeros((2, X), np.int32), z, z, z.transpose(0, 2, 1))


def test_auto_picks_native_on_cpu_pallas_on_gpu_and_loop_elsewhere():
    assert moe.choose_strategy("auto", 8, "cpu", native_ok=True) == "native"
    assert moe.choose_strategy("auto", 8, "cpu", native_ok=False) == "loop"
    assert moe.choose_strategy("auto", 8, "gpu", native_ok=True) == "loop"  # widths the GPU kernels cannot tile
    assert moe.choose_strategy("auto", 8, "gpu", pallas_ok=True) == "pallas"
    assert moe.choose_strategy("auto", 8, "cpu", native_ok=False, pallas_ok=True) == "loop"


def test_native_strategy_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    with pytest.raises(ValueError, match=r"dispatch 'native' needs moejax's CPU kernels.*MOEJAX_NATIVE=0"):
        Parallelism(moe_strategy="native").checked("cpu")
    with pytest.raises(ValueError, match="dispatch 'native' needs moejax's CPU kernels, but the backend is 'gpu'"):
        Parallelism(moe_strategy="native").checked("gpu")


@pytest.mark.skipif(not native.available(), reason="native kernels off or not built")
def test_native_strategy_in_float16_is_a_clear_error():
    z = np.zeros((1, E, D, F), jnp.float16)
    x = jnp.zeros((2, D), jnp.float16)
    with pytest.raises(ValueError, match="dispatch 'native' runs float32 or bfloat16 only.*float16"):
        moe.local_dispatch(x, jnp.zeros((2, X)), jnp.zeros((2, X), jnp.int32), (z, z, z.transpose(0, 1, 3, 2)), 0,
                           "native")
