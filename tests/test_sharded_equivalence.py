"""Every layout of 8 devices gives the 1-device logits (<= 1e-5, fp32) and identical greedy tokens."""

import jax
import numpy as np
import pytest

import moejax

LAYOUTS = ["DP8", "TP4", "EP8", "PP2", "DP2TP2EP2", "TP2EP2PP2", "EP4PP2", "DP2EP4"]
# The default suite runs DP, TP, EP and PP alone and the DP x TP x EP mix, the rest of the family x layout spread in
# CI's slow step (qwen2_moe on DP2TP2EP2 is also tests/test_expert_modes.py's default case; TP2EP2PP2 runs against
# HF in tests/test_hf_parity.py and tests/test_families.py, and prefill + decode in tests/test_kv_cache_decode.py).
DEFAULT = {("qwen2_moe", "DP8"), ("qwen2_moe", "TP4"), ("qwen2_moe", "EP8"), ("qwen2_moe", "PP2"),
           ("qwen3_moe", "DP2TP2EP2")}
CASES = [pytest.param(family, layout, marks=() if (family, layout) in DEFAULT else pytest.mark.slow)
         for family in ("qwen2_moe", "qwen3_moe") for layout in LAYOUTS]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 128, n).tolist() for n in (9, 3, 20)]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_layout_matches_one_device(family, layout, hf_checkpoints, models_1dev, prompts):
    path, _ = hf_checkpoints[family]
    model = moejax.load(path, layout=layout)
    base = models_1dev[family]
    ids = np.random.default_rng(8).integers(0, 128, (3, 24))
    np.testing.assert_allclose(model.forward(ids), base.forward(ids), atol=1e-5, rtol=0)
    assert model.generate(prompts, max_new_tokens=32) == base.generate(prompts, max_new_tokens=32)


@pytest.mark.parametrize(("mode", "shared"), [("replicated_attention", 10), ("dp_attention", 20)])
def test_weights_are_sharded_as_the_rules_say(hf_checkpoints, mode, shared):
    """TP2EP2PP2 on a 3-layer, 8-expert, 8-head / 2-kv-head model: per-device shard shapes."""
    path, _ = hf_checkpoints["qwen2_moe"]
    model = moejax.load(path, layout="TP2EP2PP2", expert_mode=mode)
    p = model.params
    # 3 layers padded to 2 stages x 2 layers, stacked [4, ...] and split over stage; experts stacked
    # [4, 8, ...] split over stage and expert; the shared expert's width (40) over tensor x expert in
    # "replicated_attention" mode (the expert group holds the same tokens) and over tensor in "dp_attention" mode.
    expected = {
        ("layers", "moe", "wg"): (2, 4, 48, 16),  # layers / stage, experts / expert, F / tensor
        ("layers", "moe", "wd"): (2, 4, 16, 48),
        ("layers", "moe", "router"): (2, 48, 8),  # every device scores every expert
        ("layers", "moe", "shared_wg"): (2, 48, shared),
        ("layers", "attn", "wq"): (2, 48, 4, 16),  # heads / tensor
        ("layers", "attn", "wk"): (2, 48, 1, 16),  # kv heads / tensor
        ("embed",): (64, 48),  # vocab / tensor
        ("unembed",): (48, 64),
    }
    for path_, shard_shape in expected.items():
        array = p
        for key in path_:
            array = array[key]
        shapes = {s.data.shape for s in array.addressable_shards}
        assert shapes == {shard_shape}, (path_, shapes)
        assert len(array.sharding.device_set) == 8
    # A device holds 1/8 of the expert weights, not a replicated copy.
    wg = p["layers"]["moe"]["wg"]
    assert wg.shape == (4, 8, 48, 32) and wg.addressable_shards[0].data.size * 8 == wg.size
    assert jax.device_count() == 8


def test_kv_heads_fewer_than_tensor_are_replicated(hf_checkpoints, models_1dev):
    """2 kv heads on tensor=4: each shard holds the kv head its query heads read."""
    path, _ = hf_checkpoints["mixtral"]
    model = moejax.load(path, layout="TP4")
    assert model.params["layers"]["attn"]["wk"].shape[2] == 4
    ids = np.random.default_rng(9).integers(0, 128, (2, 16))
    np.testing.assert_allclose(model.forward(ids), models_1dev["mixtral"].forward(ids), atol=1e-5, rtol=0)


def test_stage_padding_layers_are_identity(hf_checkpoints, models_1dev):
    """3 layers over 2 stages: stage 0 runs layers 0-1, stage 1 runs layer 2 and a zero padding layer."""
    path, _ = hf_checkpoints["mixtral"]
    model = moejax.load(path, layout="PP2")
    # Stored layers: 0, 1 (stage 0), 2, padding (stage 1).
    wq = np.asarray(model.params["layers"]["attn"]["wq"])
    assert wq.shape[0] == 4 and not wq[3].any() and all(wq[i].any() for i in range(3))
    ids = np.random.default_rng(10).integers(0, 128, (1, 12))
    np.testing.assert_allclose(model.forward(ids), models_1dev["mixtral"].forward(ids), atol=1e-5, rtol=0)
