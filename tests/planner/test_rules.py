"""Layout enumeration: default rules == what the runtime builds (`Layout.validate`); flags tighten them."""

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.rules import Rules, enumerate_layouts

MODELS = ["mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "glm-4.5-air",
          "gpt-oss-20b", "olmoe-1b-7b", "gpt-moe-1800b"]


def _runtime_builds(layout: Layout, cfg) -> bool:
    try:
        layout.validate(cfg)
    except ValueError:
        return False
    return True


# Odd vocabularies (97, 131: primes) and FFN widths (30, 36, 250, 18430) that no TP > 2 divides: the runtime pads them.
ODD = [("tiny-moe", dict(vocab_size=97)), ("tiny-moe", dict(vocab_size=131, moe_intermediate_size=30)),
       ("tiny-moe", dict(family="qwen2_moe", vocab_size=131, moe_intermediate_size=30,
                         shared_expert_intermediate_size=36)),
       ("mixtral-8x7b", dict(vocab_size=32001, moe_intermediate_size=250)),
       ("tiny-moe", dict(num_heads=6, num_kv_heads=3, vocab_size=97, num_layers=3)),
       ("tiny-moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=36)),
       ("deepseek-v3", dict(vocab_size=129281, dense_intermediate_size=18430))]


@pytest.mark.parametrize("name,changes", ODD, ids=[f"{n}-{'-'.join(str(v) for v in c.values())}" for n, c in ODD])
@pytest.mark.parametrize("n", [6, 8, 12])
def test_planner_valid_equals_runtime_valid(name, changes, n):
    cfg = load_model_config(name).replace(**changes)
    accepted, rejected = enumerate_layouts(n, cfg)
    assert accepted == [lay for lay in Layout.enumerate(n) if _runtime_builds(lay, cfg)]
    for lay, reasons in rejected:
        with pytest.raises(ValueError) as err:
            lay.validate(cfg)
        assert reasons and str(err.value) == f"layout {lay} cannot run model {cfg.name}: " + "; ".join(reasons)


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


def test_vocabulary_and_expert_widths_need_not_divide():
    cfg = load_model_config("mixtral-8x7b").replace(vocab_size=32001, moe_intermediate_size=14337)
    accepted, _ = enumerate_layouts(8, cfg)
    assert {lay.tensor for lay in accepted} == {1, 2, 4, 8}
    lines = Rules().describe()
    assert not any("divides the vocabulary" in line for line in lines)
    assert any("vocabulary, routed-expert and dense FFN widths padded" in line for line in lines)


def test_flags_tighten():
    gpt = load_model_config("gpt-moe-1800b")
    in_domain, rejected = enumerate_layouts(64, gpt, Rules(tp_within_domain=True, ep_within_domain=True), 8)
    assert in_domain and all(lay.tensor * lay.expert <= 8 for lay in in_domain)
    assert any("NVLink domain" in r for _, reasons in rejected for r in reasons)
    no_rep, _ = enumerate_layouts(64, gpt, Rules(allow_kv_replication=False))
    assert max(lay.tensor for lay in no_rep) == 8  # 8 KV heads
    deep, rejected = enumerate_layouts(64, gpt, Rules(min_layers_per_stage=4))
    assert max(lay.stage for lay in deep) == 16
    assert dict((str(lay), r) for lay, r in rejected)["DP2PP32"] == [
        "PP (32) x min layers per stage (4) exceeds the layers (120)"]  # tighter than the runtime: no stage rule


def test_default_rules_keep_the_runtime_s_stage_message():
    cfg = load_model_config("tiny-moe")  # 4 layers
    _, rejected = enumerate_layouts(8, cfg)
    assert dict((str(lay), r) for lay, r in rejected)["PP8"] == ["stage (8) cannot exceed the number of layers (4)"]


def test_rules_are_described():
    lines = Rules(tp_within_domain=True).describe(72)
    assert any("EP divides" in line for line in lines)
    assert any("NVLink domain (72 devices)" in line for line in lines)
