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
    with pytest.raises(ValueError, match="multiple of TP"):
        PlanLayout.of("TP8MTP1EP4")


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
