"""Attention and MoE split apart: the planner's layout syntax, its runtime special cases, enumeration and rules."""

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.hardware import load_hardware
from moejax.planner.layout import PlanLayout, enumerate_split
from moejax.planner.memory import stored_config
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import predict
from moejax.planner.workload import Options, Workload
from moejax.sharding import Parallelism


def test_runtime_layouts_are_special_cases():
    data = PlanLayout.of("DP2TP2EP2", "dp_attention")
    assert (data.tensor, data.moe_tensor, data.expert, data.attention_data, data.replication) == (2, 2, 2, 2, 1)
    rep = PlanLayout.of(Layout(tensor=2, expert=4), "replicated_attention")
    assert (rep.attention_data, rep.replication, rep.group, rep.size) == (1, 4, 8, 8)
    assert str(data) == "DP2TP2EP2" and str(rep) == "TP2EP4"


@pytest.mark.parametrize("text,shape", [("TP8MTP1EP8", (8, 1, 8, 1)), ("TP4MTP1EP8", (4, 1, 8, 2)),
                                        ("TP1MTP2EP4PP2", (1, 2, 4, 8)), ("DP2TP2MTP4", (2, 4, 1, 2))])
def test_split_syntax_round_trips(text, shape):
    lay = PlanLayout.of(text)
    assert (lay.tensor, lay.moe_tensor, lay.expert, lay.attention_data) == shape
    assert PlanLayout.of(str(lay)) == lay and not lay.runtime


def test_split_must_cover_the_attention_group():
    with pytest.raises(ValueError, match="multiple of TP") as planner:
        PlanLayout.of("TP8MTP1EP4")
    with pytest.raises(ValueError) as runtime:
        Layout.parse("TP8MTP1EP4")
    assert str(planner.value) == str(runtime.value)  # one parser, one message


def _runtime_refusal(layout: Layout, cfg) -> str | None:
    """What the runtime says when asked to run `layout` (None: it builds the layout's parallelism)."""
    try:
        Parallelism(layout.validate(cfg)).checked("cpu")
    except ValueError as err:
        return str(err)
    return None


# Odd shapes too: 6 heads / 3 kv heads (TP4, TP8 refused), 6 experts (EP4, EP8 refused), 3 layers (PP4+ refused).
SPLIT_MODELS = [("tiny-moe", {}), ("qwen3-30b-a3b", {}), ("deepseek-v3", {}), ("gpt-oss-20b", {}),
                ("tiny-moe", dict(num_heads=6, num_kv_heads=3, num_experts=6, num_layers=3))]


@pytest.mark.parametrize("n", [8, 16])
@pytest.mark.parametrize("name,changes", SPLIT_MODELS, ids=[n + ("-odd" if c else "") for n, c in SPLIT_MODELS])
def test_planner_and_runtime_accept_and_refuse_the_same_layouts_in_the_same_words(name, changes, n):
    """Every layout of n devices, split ones included: the planner accepts exactly those the runtime builds, and
    rejects the others with the runtime's own reasons, word for word."""
    cfg = load_model_config(name).replace(**changes)
    accepted, rejected = enumerate_layouts(n, cfg, Rules(split_moe=True))
    candidates = Layout.enumerate(n, split_moe=True)
    assert len(accepted) + len(rejected) == len(candidates)
    refusals = {str(lay): _runtime_refusal(lay, cfg) for lay in candidates}
    assert {str(lay) for lay in accepted} == {k for k, v in refusals.items() if v is None}
    assert any(lay.split for lay in Layout.enumerate(n, cfg, split_moe=True))
    for lay, reasons in rejected:
        assert refusals[str(lay)] == f"layout {lay} cannot run model {cfg.name}: " + "; ".join(reasons)
    for lay in accepted:  # one layout, one meaning: the planner's reading is the runtime's
        assert PlanLayout.of(str(lay)).layout == Layout.parse(str(lay))


def test_enumeration_extends_the_runtime_set():
    cfg = load_model_config("qwen3-235b-a22b")
    runtime, _ = enumerate_layouts(8, cfg)
    both, rejected = enumerate_layouts(8, cfg, Rules(split_moe=True))
    assert both[:len(runtime)] == runtime
    split = [lay for lay in both if isinstance(lay, PlanLayout)]
    assert {"TP8MTP1EP8", "TP8MTP2EP4", "TP4MTP1EP8", "TP1MTP2EP4"} <= {str(s) for s in split}
    assert len(enumerate_split(8)) == len(split) + sum(isinstance(lay, PlanLayout) for lay, _ in rejected)
    assert all(lay.size == 8 for lay in split)


def test_split_layouts_pad_the_expert_width_to_moe_tensor():
    cfg = load_model_config("mixtral-8x7b").replace(moe_intermediate_size=14336 + 2)
    lay = PlanLayout.of("TP2MTP4EP1")
    assert Rules().problems(lay, cfg) == []  # padded, as the runtime pads it to its tensor factor
    assert stored_config(cfg, lay).moe_intermediate_size == 14340
    assert stored_config(cfg, PlanLayout.of("TP2EP2")).moe_intermediate_size == 14338


def test_attention_tp_with_moe_ep_differs_from_both_runtime_modes():
    cfg, hw, w = load_model_config("qwen3-235b-a22b"), load_hardware("h200"), Workload(precision="fp8")
    split = predict(cfg, "TP8MTP1EP8", hw, w, batch=64, chunk=1024)
    dep = predict(cfg, "EP8", hw, w, batch=64, chunk=1024)
    rep = predict(cfg, "EP8", hw, w, Options(expert_mode="replicated_attention"), batch=64, chunk=1024)
    assert split.layout == "TP8MTP1EP8" and len({split.tpot_s, dep.tpot_s, rep.tpot_s}) == 3
    # attention over TP8 splits the KV cache 8 ways like DEP8 does, but per request rather than per group
    assert split.feasible and dep.feasible
