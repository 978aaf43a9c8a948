"""DeepSeek-V3, GLM-4.5, OLMoE and gpt-oss (and their variants) against Hugging Face transformers, float32 eager.

End to end: prefill logits (<= 1e-4) and 16 greedy tokens on a spread of 8-device layouts: data, tensor and expert
parallelism in both expert modes, pipeline stages with a boundary inside the MoE stack (PP2 on 1 dense + 3 MoE
layers: stage 0 = dense + MoE layer 1) and between the dense and MoE stacks (PP4: the dense layer alone on stage 0),
and mixes. Each family gets four layouts (a variant one, with tensor > 1: its attention differs), so the file
stays fast; together they cover the list (test_layouts_cover_the_list).

Per block (one device), so a failure names it: each layer's attention, router (weights and expert ids), MoE block
(routed + shared experts) and dense FFN against the Hugging Face module of the same layer, on random normal
inputs [2, 24, D]. Tolerances (absolute, float32): attention, dense FFN 1e-5; MoE block 2e-5 (outputs reach 15:
DeepSeek's routed_scaling_factor 2.5); router weights 1e-6, expert ids exact.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moejax
from moejax.checkpoint.hf import HFSource
from moejax.model.rope import Rope
from moejax.model.router import route
from tests import hf_models

NEW = ["deepseek_v3", "glm4_moe", "olmoe", "gpt_oss"]
NAMES = NEW + list(hf_models.VARIANTS)
DP, REP = "dp_attention", "replicated_attention"

SLOW = pytest.mark.slow  # the rest of the spread runs in CI's slow step (the default suite keeps one per case kind)
# (checkpoint, layout, expert mode). The expert mode matters only where expert > 1.
LAYOUTS = [
    ("deepseek_v3", "PP4", DP),  # the dense layer alone on stage 0: a boundary between the stacks
    pytest.param(*("deepseek_v3", "DP2TP2EP2", DP), marks=SLOW),
    pytest.param(*("deepseek_v3", "EP8", REP), marks=SLOW),
    pytest.param(*("deepseek_v3", "TP4", DP), marks=SLOW),  # MLA: query heads split, the latent replicated over tensor
    ("deepseek_v3_no_q_lora", "TP2EP2PP2", DP),  # stage 0 = dense + MoE layer 1: a boundary inside the MoE stack
    ("deepseek_v3_yarn_bias", "TP2EP4", REP),
    pytest.param(*("glm4_moe", "PP2", DP), marks=SLOW),
    pytest.param(*("glm4_moe", "DP2EP4", DP), marks=SLOW),
    ("glm4_moe", "TP2EP2PP2", REP),
    pytest.param(*("glm4_moe", "DP8", DP), marks=SLOW),
    ("olmoe", "TP4", DP),  # q/k norms over the whole projected width, split over tensor; 2 kv heads repeated
    pytest.param(*("olmoe", "EP8", DP), marks=SLOW),
    pytest.param(*("olmoe", "DP2TP2EP2", REP), marks=SLOW),
    pytest.param(*("olmoe", "PP2", DP), marks=SLOW),  # 3 layers: 2 + 1
    ("olmoe_clip_qkv", "TP2EP4", DP),
    ("gpt_oss", "TP2EP2PP2", DP),
    pytest.param(*("gpt_oss", "EP8", REP), marks=SLOW),
    pytest.param(*("gpt_oss", "PP4", DP), marks=SLOW),  # one layer per stage: sliding, full, sliding, full
    pytest.param(*("gpt_oss", "TP8", DP), marks=SLOW),  # one head (and its sink) per shard
]
IDS = np.random.default_rng(21).integers(0, 128, (4, 40))  # 40 tokens: past gpt-oss's window of 8
PROMPTS = [np.random.default_rng(22).integers(0, 128, n).tolist() for n in (5, 17, 30)]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoints, tmp_path_factory):
    """name -> (checkpoint dir, torch model): the session's new families and their variants, built here."""
    root = tmp_path_factory.mktemp("family_variants")
    out = {name: hf_checkpoints[name] for name in NEW}
    for name in hf_models.VARIANTS:
        out[name] = (root / name, hf_models.build(name, root / name))
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    """name -> (HF logits of IDS, HF greedy tokens of PROMPTS), computed once per checkpoint."""
    memo = {}

    def get(name):
        if name not in memo:
            ref = checkpoints[name][1]
            memo[name] = (hf_models.hf_logits(ref, IDS), [hf_models.hf_greedy(ref, p, NEW_TOKENS) for p in PROMPTS])
        return memo[name]

    return get


@pytest.fixture(scope="module")
def one_device(checkpoints):
    """name -> the moejax model on one device (loaded on first use)."""
    memo = {}

    def get(name):
        if name not in memo:
            memo[name] = moejax.load(checkpoints[name][0], layout="DP1")
        return memo[name]

    return get


# ---- end to end, sharded ---------------------------------------------------------------------------------------


CASES = [getattr(case, "values", case) for case in LAYOUTS]  # (name, layout, mode), slow ones unwrapped


@pytest.mark.parametrize(("name", "layout", "mode"), LAYOUTS, ids=[f"{n}-{lay}-{m[:3]}" for n, lay, m in CASES])
def test_layout_matches_hf(name, layout, mode, checkpoints, reference):
    model = moejax.load(checkpoints[name][0], layout=layout, expert_mode=mode)
    want_logits, want_tokens = reference(name)
    got = model.forward(IDS)
    np.testing.assert_allclose(got, want_logits, atol=1e-4, rtol=0, err_msg=f"{name} {layout} {mode} logits")
    assert (got.argmax(-1) == want_logits.argmax(-1)).all()
    assert model.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == want_tokens


def test_layouts_cover_the_list():
    """Every parallel form, both expert modes, and both kinds of stage boundary appear above."""
    from moejax.mesh import Layout

    layouts = {(name, Layout.parse(lay), mode) for name, lay, mode in CASES}
    assert any(lay.data > 1 and lay.size == lay.data for _, lay, _ in layouts)  # DP alone
    assert any(lay.tensor > 1 and lay.size == lay.tensor for _, lay, _ in layouts)  # TP alone
    assert {mode for _, lay, mode in layouts if lay.expert == lay.size} == {DP, REP}  # EP alone, both modes
    assert {mode for _, lay, mode in layouts if lay.expert > 1 and lay.size > lay.expert} == {DP, REP}
    grouped = [(lay.stage_layers(4), name) for name, lay, _ in layouts if name.startswith(("deepseek", "glm"))]
    assert any(stages[0] == 1 for stages, _ in grouped)  # the dense layer alone on stage 0
    assert any(stages[0] == 2 for stages, _ in grouped)  # dense + MoE layer on stage 0
    assert {name for name, _, _ in CASES} == set(NAMES)


def test_sliding_layers_matter(checkpoints, reference):
    """gpt-oss's windows are in force: with them off, the same weights give other logits from the first position
    past the window (8) on, and identical ones before it; with them on (test_layout_matches_hf) they equal HF."""
    path, _ = checkpoints["gpt_oss"]
    source = HFSource(path)
    window = source.cfg.sliding_window
    assert window == 8 and source.cfg.sliding_layers == (0, 2)
    full_cfg = dataclasses.replace(source.cfg, sliding_window=None, sliding_layers=None)
    full = moejax.Model(full_cfg, HFSource(path, cfg=full_cfg), layout="DP1").forward(IDS)
    want, _ = reference("gpt_oss")
    np.testing.assert_allclose(full[:, :window], want[:, :window], atol=1e-4, rtol=0)
    assert np.abs(full[:, window:] - want[:, window:]).max(axis=-1).min() > 1e-3  # every later position differs


# ---- per block, one device -------------------------------------------------------------------------------------


def _x(model):
    return np.random.default_rng(23).standard_normal((2, 24, model.cfg.hidden_size)).astype(np.float32)


def _layers(model, ffn=None):
    """[(global layer, stack, slot)] of the model's layers (of stacks with FFN kind `ffn` when given)."""
    return [(layer, stack, slot) for stack in model.geometry.stacks if ffn in (None, stack.ffn)
            for layer, slot in stack.slot_of_layer().items()]


@pytest.fixture(scope="module")
def block():
    """(model, stack, kind) -> run(x_BTD, slot, windowed=False) -> y_BTD: stack `stack`'s `kind` ("attn", "moe",
    "mlp") of slot `slot` run alone, compiled once per (model, stack, kind) with the slot traced, inside a shard_map
    over the model's one-device mesh (the blocks' collectives need one). `windowed` says whether the attention
    uses the sliding window (read only when the config has per-layer windows, gpt-oss)."""
    compiled = {}

    def get(model, stack, kind):
        key = (id(model), stack.name, kind)
        if key not in compiled:
            compiled[key] = (model, _compile_block(model, stack.name, kind))  # the model kept alive with its key
        fn = compiled[key][1]

        def run(x_BTD, slot, windowed=False):
            with jax.set_mesh(model.mesh):
                return np.asarray(fn(model.params, x_BTD, np.int32(slot), np.bool_(windowed)))

        return run

    yield get
    compiled.clear()


def _compile_block(model, stack_name, kind):
    steps, cfg = model.steps, model.cfg
    per_layer = bool(cfg.sliding_window) and cfg.sliding_layers is not None

    def body(params_, x_BTD_, slot_, windowed_):
        block_ = getattr(nnx.merge(steps.graphdef, params_), stack_name)
        if kind != "attn":
            return getattr(block_, kind)(slot_, x_BTD_)
        B, T, _ = x_BTD_.shape
        pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        rope = Rope.of(cfg)
        y_BTD_, _ = block_.attn(slot_, x_BTD_, pos_BT, (rope, rope.tables(pos_BT)), None, None, None,
                                windowed_ if per_layer else None)
        return y_BTD_

    return jax.jit(jax.shard_map(body, mesh=steps.mesh, in_specs=(steps.param_specs, P(), P(), P()),
                                 out_specs=P(), check_vma=steps.check_vma))


@pytest.mark.parametrize("name", NAMES)
def test_attention_block_matches_hf(name, checkpoints, one_device, block):
    model, ref = one_device(name), checkpoints[name][1]
    x = _x(model)
    for layer, stack, slot in _layers(model):
        got = block(model, stack, "attn")(x, slot, model.cfg.window_of(layer) is not None)
        np.testing.assert_allclose(got, hf_models.hf_attention(ref, layer, x), atol=1e-5, rtol=0,
                                   err_msg=f"{name} layer {layer} attention")


def test_sliding_attention_block_differs_without_window(checkpoints, one_device, block):
    """The block test has power: gpt-oss's sliding layer 0 run with full attention is not HF's."""
    model, ref = one_device("gpt_oss"), checkpoints["gpt_oss"][1]
    x = _x(model)
    [(stack, slot)] = [(stack, slot) for layer, stack, slot in _layers(model) if layer == 0]
    diff = np.abs(block(model, stack, "attn")(x, slot, False) - hf_models.hf_attention(ref, 0, x))
    assert diff[:, :8].max() < 1e-5 and diff[:, 8:].max() > 1e-2


@pytest.mark.parametrize("name", NEW)
def test_router_matches_hf(name, checkpoints, one_device):
    """Expert ids exact and weights <= 1e-6: DeepSeek / GLM (sigmoid, grouped, biased choice) compared per expert
    id (their top-k is unordered); the others in the order HF gives (descending weight)."""
    model, ref = one_device(name), checkpoints[name][1]
    cfg, x = model.cfg, _x(model)
    by_expert = cfg.router == "sigmoid"
    for layer, stack, slot in _layers(model, "moe"):
        p = model.params[stack.name]["moe"]
        weights, ids = route(cfg, jnp.asarray(x.reshape(-1, x.shape[-1])), p["router"][slot],
                             p["router_bias"][slot] if cfg.router_bias else None,
                             p["score_bias"][slot] if by_expert else None)
        weights, ids = np.asarray(weights), np.asarray(ids)
        if by_expert:
            order = np.argsort(ids, axis=-1)
            weights, ids = np.take_along_axis(weights, order, -1), np.take_along_axis(ids, order, -1)
        want_weights, want_ids = hf_models.hf_router(ref, layer, x, by_expert=by_expert)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{name} layer {layer} router ids")
        np.testing.assert_allclose(weights, want_weights, atol=1e-6, rtol=0, err_msg=f"{name} layer {layer} router")


@pytest.mark.parametrize("name", NEW)
def test_moe_block_matches_hf(name, checkpoints, one_device, block):
    model, ref = one_device(name), checkpoints[name][1]
    x = _x(model)
    for layer, stack, slot in _layers(model, "moe"):
        np.testing.assert_allclose(block(model, stack, "moe")(x, slot), hf_models.hf_mlp(ref, layer, x), atol=2e-5,
                                   rtol=0, err_msg=f"{name} layer {layer} MoE block")


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_dense_mlp_block_matches_hf(name, checkpoints, one_device, block):
    model, ref = one_device(name), checkpoints[name][1]
    x = _x(model)
    dense = _layers(model, "dense")
    assert [layer for layer, _, _ in dense] == [0]  # first_k_dense_replace=1
    for layer, stack, slot in dense:
        np.testing.assert_allclose(block(model, stack, "mlp")(x, slot), hf_models.hf_mlp(ref, layer, x), atol=1e-5,
                                   rtol=0, err_msg=f"{name} layer {layer} dense FFN")
