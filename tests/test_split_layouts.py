"""Split layouts (`TP{t}MTP{m}EP{e}`: attention TP t x DP G / t, the MoE TP m x EP e over the same G = m x e devices)
against Hugging Face transformers, float32 eager: prefill logits (<= 1e-4) and 16 greedy tokens, every family.

The layouts exercise each branch of the MoE block's collectives (`moejax.sharding.Parallelism.gather_axes`,
`exchange_axes`, `slice_axes`, `reduce_axes`), named by the sizes of the group's mesh axes (tensor, tensor_expert,
data_tensor, expert) = `Layout.split_factors`:

    TP4MTP1EP8     (1, 4, 1, 2)  exchange over 8 ranks, each tensor_expert shard sending a quarter of the tokens
    TP2MTP1EP4     (1, 2, 1, 2)  the same over 4; with a shared expert its partial sums ride the closing all-reduce
    TP2MTP4EP2     (2, 1, 2, 2)  tokens all-gathered over data_tensor (MoE TP 4 > attention TP 2), then exchanged
    TP1MTP2EP4     (1, 1, 2, 4)  attention data-parallel only; the gather with expert biases (gpt-oss)
    TP4MTP1EP4     (1, 4, 1, 1)  no exchange (attention DP 1): each device picks its experts' pairs, one all-reduce
    TP4MTP2EP2     (2, 2, 1, 1)  the same with the experts' width split too
    TP8MTP1EP8     (1, 8, 1, 1)  the same over 8 (vLLM's TP8 with --enable-expert-parallel)
    DP2TP2MTP1EP2  (1, 2, 1, 1)  with a data replica
    TP2MTP1EP2PP2  (1, 2, 1, 1)  with two pipeline stages (DeepSeek's dense layer and the first MoE layer on stage 0)

Each family has one of them as its default case (together they cover the list); the default suite runs those of
five families (Qwen3-MoE's and OLMoE's, whose paths the others cover, run in the slow step), and the full
family x layout matrix runs in CI's slow step.
"""

import jax
import numpy as np
import pytest

import moejax
from moejax.mesh import Layout
from moejax.sharding import Parallelism
from tests import hf_models

LAYOUTS = ["TP4MTP1EP8", "TP2MTP1EP4", "TP2MTP4EP2", "TP1MTP2EP4", "TP4MTP1EP4", "TP4MTP2EP2", "TP8MTP1EP8",
           "DP2TP2MTP1EP2", "TP2MTP1EP2PP2"]
DEFAULT = {  # family -> its default-suite layout
    "mixtral": "TP4MTP1EP8",
    "qwen3_moe": "TP2MTP4EP2",
    "qwen2_moe": "TP2MTP1EP4",  # shared expert with a sigmoid gate
    "deepseek_v3": "TP2MTP1EP2PP2",  # MLA, a dense layer, a shared expert, grouped sigmoid routing
    "glm4_moe": "TP4MTP2EP2",
    "olmoe": "DP2TP2MTP1EP2",
    "gpt_oss": "TP1MTP2EP4",  # expert biases, sinks, sliding windows
}
SLOW_FAMILIES = {"qwen3_moe", "olmoe"}  # their default cases run in CI's slow step too: the suite's time (see above)
CASES = [pytest.param(f, lay, marks=() if DEFAULT[f] == lay and f not in SLOW_FAMILIES else pytest.mark.slow,
                      id=f"{f}-{lay}") for f in hf_models.FAMILIES for lay in LAYOUTS]
IDS = np.random.default_rng(41).integers(0, 128, (4, 40))
PROMPTS = [np.random.default_rng(42).integers(0, 128, n).tolist() for n in (5, 17, 30)]
NEW_TOKENS = 16


@pytest.fixture(autouse=True)
def _drop_compiled_programs_per_case():
    """Each case compiles its own model's programs; the slow matrix (56 models) would exhaust the JIT's code memory
    in one module (a run of tests/split_table.py without this aborted in LLVM with "Cannot allocate memory")."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def reference(hf_checkpoints):
    """family -> (HF logits of IDS, HF greedy tokens of PROMPTS), computed once."""
    memo = {}

    def get(family):
        if family not in memo:
            ref = hf_checkpoints[family][1]
            memo[family] = (hf_models.hf_logits(ref, IDS), [hf_models.hf_greedy(ref, p, NEW_TOKENS) for p in PROMPTS])
        return memo[family]

    return get


def test_every_family_and_layout_is_listed():
    assert set(DEFAULT) == set(hf_models.FAMILIES) and set(DEFAULT.values()) <= set(LAYOUTS)
    assert all(Layout.parse(lay).split and str(Layout.parse(lay)) == lay for lay in LAYOUTS)


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_split_layout_matches_hf(family, layout, hf_checkpoints, reference):
    model = moejax.load(hf_checkpoints[family][0], layout=layout)
    assert model.layout.split and model.mesh.devices.size == model.layout.size
    want_logits, want_tokens = reference(family)
    got = model.forward(IDS)
    np.testing.assert_allclose(got, want_logits, atol=1e-4, rtol=0, err_msg=f"{family} {layout} logits")
    assert model.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == want_tokens


# ---- which collectives each layout runs (host only, no device work) ------------------------------------------


@pytest.mark.parametrize(("layout", "factors", "gather", "exchange", "sliced", "reduce"), [
    ("TP2EP4", (2, 1, 1, 4), (), ("expert",), (), ("tensor",)),  # the runtime's dp_attention: unchanged
    ("TP4MTP1EP8", (1, 4, 1, 2), (), ("tensor_expert", "expert"), ("tensor_expert",), ("tensor_expert",)),
    ("TP2MTP4EP2", (2, 1, 2, 2), ("data_tensor",), ("expert",), (), ("tensor",)),
    ("TP4MTP2EP2", (2, 2, 1, 1), (), (), (), ("tensor", "tensor_expert")),
    ("TP8MTP1EP8", (1, 8, 1, 1), (), (), (), ("tensor_expert",)),
    ("TP2MTP3EP2", (1, 2, 3, 1), ("data_tensor",), (), (), ("tensor_expert",)),  # attention DP only over the gather
])
def test_the_moe_collectives_follow_the_layout(layout, factors, gather, exchange, sliced, reduce):
    par = Parallelism(layout)
    assert par.layout.split_factors == factors
    assert (par.gather_axes, par.exchange_axes, par.slice_axes, par.reduce_axes) == (gather, exchange, sliced, reduce)
    # attention's split: heads over TP, requests over DP x the group's attention data parallelism
    assert par.size("heads") == par.layout.tensor and par.size("ffn") == par.layout.moe_tp
    assert par.size("experts") == par.layout.expert
    assert par.batch_shards == par.layout.data * par.layout.attention_data


@pytest.mark.parametrize(("text", "match"), [
    ("TP8MTP1EP4", "MTP 1 x EP 4 must be a multiple of TP 8"),
    ("TP2MTP0EP2", "MTP must be a positive integer"),
    ("TP2MTP1MTP2", "given twice"),
])
def test_bad_split_layouts_are_refused_with_the_numbers(text, match):
    with pytest.raises(ValueError, match=match):
        Layout.parse(text)


def test_a_split_layout_needs_attention_data_parallel():
    with pytest.raises(ValueError, match="expert mode 'dp_attention'"):
        Parallelism("TP2MTP1EP2", expert_mode="replicated_attention")


def test_a_runtime_layout_keeps_its_meaning_and_mesh():
    assert Layout.parse("TP2MTP2EP4") == Layout.parse("TP2EP4") and not Layout.parse("TP2EP4").split
    assert tuple(Layout.parse("TP2EP4").mesh_sizes()) == ("data", "stage", "expert", "tensor")
    assert Layout.parse("TP4MTP1EP8").size == 8 and Layout.parse("DP2TP2MTP1EP2PP2").size == 8
