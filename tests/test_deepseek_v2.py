"""DeepSeek-V2: MLA with its complex-number RoPE, softmax routing (greedy and group-limited), scaled, against
transformers on tiny random checkpoints."""

import numpy as np
import pytest

import moejax
from tests import hf_models


def _build(path, **overrides):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(**{
        **hf_models._COMMON, "num_hidden_layers": 3, "num_key_value_heads": 8, "head_dim": 8,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 40,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "routed_scaling_factor": 2.0,
        **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("overrides,layout", [
    pytest.param(dict(topk_method="greedy"), "TP2EP2", marks=pytest.mark.slow),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2), "DP2EP2PP2"),
    pytest.param(dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=None), "EP4",
                 marks=pytest.mark.slow),
], ids=["greedy", "group-limited", "no-q-lora"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, overrides, layout):
    ref = _build(tmp_path, **overrides)
    model = moejax.load(tmp_path, layout=layout)
    cfg = model.cfg
    assert (cfg.family, cfg.attention, cfg.router, cfg.routed_scaling_factor) == ("deepseek_v2", "mla", "softmax", 2.0)
    assert cfg.n_group == overrides.get("n_group", 1)
    ids = np.random.default_rng(0).integers(0, 128, (2, 24))
    np.testing.assert_allclose(model.forward(ids), hf_models.hf_logits(ref, ids), atol=1e-4, rtol=0)
    prompts = [ids[0, :9].tolist(), ids[1, :3].tolist()]
    assert model.generate(prompts, max_new_tokens=16) == [hf_models.hf_greedy(ref, p, 16) for p in prompts]
