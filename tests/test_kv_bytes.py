"""KV bytes per token: the runtime's pools (the attention kind's layout) against the planner and the one formula."""

import pytest

from moejax.bench import kv_bytes
from moejax.config import ModelConfig
from tests import hf_models

FAMILIES = [*hf_models.FAMILIES, "deepseek_v3_no_q_lora"]


def _cfg(family: str) -> ModelConfig:
    hf = hf_models.hf_config(family).to_dict()
    return ModelConfig.from_hf({**hf, "model_type": hf.get("model_type") or family.split("_no")[0]})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout,mode", [("DP1", "dp_attention"), ("TP2", "dp_attention"), ("TP4EP2", "dp_attention"),
                                         ("DP2EP2", "dp_attention"), ("TP2EP2", "replicated_attention")])
def test_runtime_pools_equal_the_planner_and_the_formula(family, layout, mode):
    cfg = _cfg(family)
    row = kv_bytes.measure(cfg, layout, "float32", mode)
    assert row["runtime_bytes"] == row["planner_bytes"]
    tensor = int(layout.split("TP")[1][0]) if "TP" in layout else 1
    per_layer = cfg.kv_bytes_per_token(4) / cfg.num_layers
    if cfg.attention == "mla":  # one latent for all heads: replicated over tensor
        assert row["runtime_bytes"] == per_layer == 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        assert row["gqa_equivalent_bytes"] > 4 * row["runtime_bytes"]
    else:  # kv heads split over tensor, repeated up to it when fewer
        assert row["runtime_bytes"] == per_layer * max(cfg.num_kv_heads, tensor) / cfg.num_kv_heads / tensor


def test_allocated_pools_measure_what_the_trace_says():
    cfg = _cfg("deepseek_v3")
    traced = kv_bytes.measure(cfg, "DP2EP2", "float32")
    allocated = kv_bytes.measure(cfg, "DP2EP2", "float32", allocate=True)
    assert allocated["runtime_bytes"] == traced["runtime_bytes"] == traced["planner_bytes"]
