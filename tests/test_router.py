"""The three routers against numpy references written from the published definitions (`moejax.model.router`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ModelConfig
from moejax.model.router import route

D, E, X = 16, 16, 4


def _cfg(**kw):
    return ModelConfig(family="deepseek_v3", vocab_size=8, hidden_size=D, num_layers=1, num_heads=2, num_kv_heads=2,
                       head_dim=8, moe_intermediate_size=8, num_experts=E, num_experts_per_tok=X, **kw)


def _inputs(seed=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((32, D)).astype(np.float32), rng.standard_normal((D, E)).astype(np.float32),
            rng.standard_normal(E).astype(np.float32))


def _check(cfg, weights, experts, ref_w, ref_top):
    order = np.argsort(np.asarray(experts), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(experts), order, -1), np.sort(ref_top, -1))
    ref_order = np.argsort(ref_top, -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(ref_w, ref_order, -1), atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_then_topk(normalize):
    x, router, _ = _inputs()
    cfg = _cfg(router="softmax", norm_topk_prob=normalize)
    weights, experts = route(cfg, jnp.asarray(x), jnp.asarray(router))
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :X]
    ref_w = np.take_along_axis(probs, top, -1)
    if normalize:
        ref_w /= ref_w.sum(-1, keepdims=True)
    _check(cfg, weights, experts, ref_w, top)


@pytest.mark.parametrize("n_group,topk_group,normalize", [(4, 2, True), (4, 1, False), (1, 1, True)])
def test_sigmoid_grouped_with_correction_bias(n_group, topk_group, normalize):
    """DeepSeek-V3: choose by sigmoid + bias within the best groups (a group scores its two best), weigh by the
    unbiased sigmoid, renormalise, scale."""
    x, router, bias = _inputs()
    bias *= 0.5
    cfg = _cfg(router="sigmoid", n_group=n_group, topk_group=topk_group, norm_topk_prob=normalize,
               routed_scaling_factor=2.5)
    weights, experts = route(cfg, jnp.asarray(x), jnp.asarray(router), score_bias_E=jnp.asarray(bias))
    scores = 1 / (1 + np.exp(-(x @ router)))
    choice = scores + bias
    size = E // n_group
    ref_w, ref_top = [], []
    for m in range(len(x)):
        groups = choice[m].reshape(n_group, size)
        group_score = np.sort(groups, -1)[:, -2:].sum(-1)
        kept = np.argsort(-group_score)[:topk_group]
        masked = np.full(E, -np.inf)
        for g in kept:
            masked[g * size:(g + 1) * size] = choice[m, g * size:(g + 1) * size]
        top = np.argsort(-masked)[:X]
        w = scores[m, top]
        if normalize:
            w = w / (w.sum() + 1e-20)
        ref_w.append(w * 2.5)
        ref_top.append(top)
        assert len({int(t) // size for t in top}) <= topk_group  # the group limit holds
    _check(cfg, weights, experts, np.array(ref_w), np.array(ref_top))
    # The correction bias changes the choice, not the weights' source: without it other experts win somewhere.
    _, unbiased = route(cfg, jnp.asarray(x), jnp.asarray(router), score_bias_E=jnp.zeros(E))
    assert not np.array_equal(np.sort(np.asarray(unbiased), -1), np.sort(np.asarray(experts), -1))


def test_topk_then_softmax_with_router_bias():
    """gpt-oss: logits + bias, top-k of the logits, softmax over the k."""
    x, router, bias = _inputs()
    cfg = _cfg(router="topk_softmax", router_bias=True)
    weights, experts = route(cfg, jnp.asarray(x), jnp.asarray(router), bias_E=jnp.asarray(bias))
    logits = x @ router + bias
    top = np.argsort(-logits, -1)[:, :X]
    vals = np.take_along_axis(logits, top, -1)
    ref_w = np.exp(vals - vals.max(-1, keepdims=True))
    ref_w /= ref_w.sum(-1, keepdims=True)
    _check(cfg, weights, experts, ref_w, top)
