"""The compiled step does not grow with the number of experts or layers (stacked weights, layer scan)."""

import numpy as np
import pytest

import moejax
from moejax.gpu_target import hlo_instructions

BASE = dict(family="qwen3_moe", vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
            moe_intermediate_size=16, num_experts_per_tok=4, norm_topk_prob=True, qk_norm=True)


def _step_instructions(num_experts, num_layers, layout):
    cfg = moejax.ModelConfig(num_experts=num_experts, num_layers=num_layers, **BASE)
    model = moejax.Model.random(cfg, layout=layout)
    steps = model.steps
    B, T, pages = 2 * model.layout.data, 4, 2
    cache = steps.new_cache(4 * model.layout.data, 4)
    args = [steps_put(model, a) for a in (np.zeros((B, T), np.int32), np.zeros((B, T), np.int32),
                                           np.zeros((B, pages), np.int32))]
    index = steps_put(model, np.zeros((B,), np.int32), tokens=True)
    import jax

    with jax.set_mesh(model.mesh):
        text = steps.step.lower(model.params, cache, *args, index).compile().as_text()
    return hlo_instructions(text)


def steps_put(model, array, tokens=False):
    from moejax import steps as steps_lib

    return model.steps.put(array, steps_lib.TOKENS if tokens else steps_lib.BATCH)


@pytest.mark.parametrize("layout", ["DP1", "EP2PP2"])
def test_step_size_is_independent_of_experts_and_layers(layout):
    # XLA picks other forms for a few routing ops (sort, bincount) by their size, so counts move by
    # a few dozen to a hundred instructions (measured: DP1 1854 / 1924 / 1924, EP2PP2 3633 / 3747 / 3773);
    # per-expert or per-layer code would add hundreds of instructions per expert or layer. (At least
    # 2 layers per stage: XLA inlines a scan of length 1.)
    tiny, small, big = (_step_instructions(e, n, layout) for e, n in ((16, 4), (64, 8), (128, 16)))
    assert abs(big - small) <= 0.02 * small, (small, big)
    assert abs(tiny - small) <= 0.05 * small, (tiny, small)
