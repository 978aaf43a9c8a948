"""Logits and greedy tokens against Hugging Face transformers (float32, eager) on tiny random checkpoints."""

import numpy as np
import pytest

import moejax
from tests import hf_models

FAMILIES = list(hf_models.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, hf_checkpoints, models_1dev):
    _, ref_model = hf_checkpoints[family]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, (2, 72))
    ref = hf_models.hf_logits(ref_model, ids)
    out = models_1dev[family].forward(ids)
    assert out.shape == ref.shape == (2, 72, 128)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_long_prompt_logits_match_hf(hf_checkpoints, models_1dev):
    """A 300-token prompt: RoPE at large positions, with the last positions checked too."""
    _, ref_model = hf_checkpoints["qwen3_moe"]
    ids = np.random.default_rng(2).integers(0, 128, (1, 300))
    ref = hf_models.hf_logits(ref_model, ids)
    out = models_1dev["qwen3_moe"].forward(ids)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[:, -16:], ref[:, -16:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_greedy_generate_matches_hf(family, hf_checkpoints, models_1dev):
    _, ref_model = hf_checkpoints[family]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 128, n).tolist() for n in (5, 17, 1, 33)]
    out = models_1dev[family].generate(prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, out, strict=True):
        assert got == hf_models.hf_greedy(ref_model, prompt, 32)


@pytest.mark.parametrize(
    "family,overrides",
    [("qwen3_moe", dict(tie_word_embeddings=True, norm_topk_prob=True)),
     ("mixtral", dict(num_key_value_heads=8, head_dim=8, sliding_window=6))],
    ids=["qwen3-tied-renorm", "mixtral-mha-sliding-window"],
)
def test_config_variants_match_hf(family, overrides, tmp_path):
    ref_model = hf_models.build(family, tmp_path, seed=5, **overrides)
    ids = np.random.default_rng(4).integers(0, 128, (2, 24))
    model = moejax.load(tmp_path, layout="TP2EP2PP2")
    np.testing.assert_allclose(model.forward(ids), hf_models.hf_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_fused_expert_checkpoint_loads_identically(hf_checkpoints, models_1dev, tmp_path):
    """The in-memory (fused gate_up_proj / down_proj) tensor names, as some hub checkpoints store them."""
    import shutil

    from safetensors.torch import save_file

    path, ref_model = hf_checkpoints["qwen2_moe"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    ids = np.random.default_rng(6).integers(0, 128, (1, 20))
    fused = moejax.load(tmp_path, layout="DP1")
    per_expert = models_1dev["qwen2_moe"].params
    for name in ("wg", "wu", "wd"):  # stacked [layers, experts, ...]
        np.testing.assert_array_equal(fused.params["layers"]["moe"][name], per_expert["layers"]["moe"][name])
    np.testing.assert_array_equal(fused.forward(ids), models_1dev["qwen2_moe"].forward(ids))
