"""Layout enumeration: default rules == the runtime's; flags relax and tighten them."""

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.rules import Rules, enumerate_layouts

MODELS = ["mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-moe-1800b"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [8, 64])
def test_default_rules_are_the_runtime_rules(name, n):
    cfg = load_model_config(name)
    accepted, rejected = enumerate_layouts(n, cfg)
    assert accepted == Layout.enumerate(n, cfg)
    assert len(accepted) + len(rejected) == len(Layout.enumerate(n))
    assert all(lay.size == n for lay in accepted)


def test_gpt_moe_64_devices_counts():
    accepted, rejected = enumerate_layouts(64, load_model_config("gpt-moe-1800b"))
    assert len(accepted) + len(rejected) == 84  # ordered factorisations of 2^6 into 4 factors: C(9, 3)
    assert {str(lay) for lay, _ in rejected} == {"EP32PP2", "EP64", "TP2EP32", "TP64", "DP2EP32"}


def test_flags_relax_and_tighten():
    cfg = load_model_config("mixtral-8x7b").replace(vocab_size=32001)
    strict, _ = enumerate_layouts(8, cfg)
    relaxed, _ = enumerate_layouts(8, cfg, Rules(allow_vocab_padding=True))
    assert all(lay.tensor == 1 for lay in strict)
    assert {lay.tensor for lay in relaxed} == {1, 2, 4, 8}
    gpt = load_model_config("gpt-moe-1800b")
    in_domain, rejected = enumerate_layouts(64, gpt, Rules(tp_within_domain=True, ep_within_domain=True), 8)
    assert in_domain and all(lay.tensor * lay.expert <= 8 for lay in in_domain)
    assert any("NVLink domain" in r for _, reasons in rejected for r in reasons)
    no_rep, _ = enumerate_layouts(64, gpt, Rules(allow_kv_replication=False))
    assert max(lay.tensor for lay in no_rep) == 8  # 8 KV heads
    deep, _ = enumerate_layouts(64, gpt, Rules(min_layers_per_stage=4))
    assert max(lay.stage for lay in deep) == 16


def test_rules_are_described():
    lines = Rules(tp_within_domain=True).describe(72)
    assert any("EP divides" in line for line in lines)
    assert any("NVLink domain (72 devices)" in line for line in lines)
