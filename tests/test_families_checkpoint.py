"""Hugging Face checkpoints of DeepSeek-V3, GLM-4.5, OLMoE and gpt-oss: names, layouts and checks.

Each tiny random checkpoint (tests/hf_models.py) is accepted exactly (every stored tensor expected, none left
over), and every canonical tensor reads back as the stored one in an independent numpy statement of the
family's layout (MLA heads, OLMoE's whole-width q/k norms, gpt-oss's interleaved fused experts). A missing
tensor is named; multi-token-prediction layers after the last layer are skipped with a warning; a quantized
checkpoint is refused by name.
"""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moejax.checkpoint import families, hf
from moejax.checkpoint.hf import CheckpointError, HFSource
from tests import hf_models

NEW = ["deepseek_v3", "glm4_moe", "olmoe", "gpt_oss"]
ST = "model.safetensors"


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoints, tmp_path_factory):
    """name -> checkpoint dir: the new families (the session's) and their variants (built here)."""
    root = tmp_path_factory.mktemp("variants")
    out = {name: hf_checkpoints[name][0] for name in NEW}
    for name in hf_models.VARIANTS:
        hf_models.build(name, root / name)
        out[name] = root / name
    return out


def _copy(src, dst, edit=None, config=None):
    """A copy of checkpoint `src` at `dst`, its tensors passed through `edit(dict)` and config.json through
    `config(dict)`."""
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / ST)
        edit(tensors)
        save_file(tensors, dst / ST)
    if config:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def _full(source, name):
    return tuple(slice(None) for _ in source.canonical[name][0])


# ---- accepted, and read as the family stores it ---------------------------------------------------------------


@pytest.mark.parametrize("name", NEW + list(hf_models.VARIANTS))
def test_checkpoint_is_accepted_exactly(name, checkpoints):
    source = HFSource(checkpoints[name])
    assert sorted(source.files) == sorted(source.expected())


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_dense_and_moe_tensors_live_in_their_layers(name, checkpoints):
    """first_k_dense_replace=1: the dense FFN in layer 0 only, router and experts in layers 1-3, attention in all."""
    source = HFSource(checkpoints[name])
    assert source.canonical["mlp.wg"][1] == (0,)
    assert source.canonical["moe.wg"][1] == source.canonical["moe.score_bias"][1] == (1, 2, 3)
    assert source.canonical["attn_norm"][1] == (0, 1, 2, 3)
    stored = load_file(checkpoints[name] / ST)
    full = _full(source, "mlp.wd")
    np.testing.assert_array_equal(source.read("mlp.wd", 0, full), stored["model.layers.0.mlp.down_proj.weight"].T)
    bias = stored["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert np.abs(bias).max() > 0.1  # drawn at random by hf_models, not transformers' zeros
    np.testing.assert_array_equal(source.read("moe.score_bias", 2, (slice(None),)), bias)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_no_q_lora", "deepseek_v3_yarn_bias"])
def test_mla_tensors_read_in_canonical_layout(name, checkpoints):
    """MLA: heads on the output rows of q_proj / q_b_proj / kv_b_proj ([N*(nope+rope), *], [N*(nope+v), R]) and on
    the input columns of o_proj [D, N*v]."""
    source = HFSource(checkpoints[name])
    stored = load_file(checkpoints[name] / ST)
    cfg, layer = source.cfg, 3
    n, nope, rope, v, r = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    attn = f"model.layers.{layer}.self_attn."

    def read(canonical):
        return source.read(canonical, layer, _full(source, canonical))

    if cfg.q_lora_rank:
        q_b = stored[attn + "q_b_proj.weight"]  # [N*(nope+rope), Rq]
        np.testing.assert_array_equal(read("attn.wq_b"), q_b.reshape(n, nope + rope, -1).transpose(2, 0, 1))
        np.testing.assert_array_equal(read("attn.wq_a"), stored[attn + "q_a_proj.weight"].T)
        np.testing.assert_array_equal(read("attn.q_a_norm"), stored[attn + "q_a_layernorm.weight"])
        assert "attn.wq" not in source.canonical
    else:
        q = stored[attn + "q_proj.weight"]
        np.testing.assert_array_equal(read("attn.wq"), q.reshape(n, nope + rope, -1).transpose(2, 0, 1))
    kv_b = stored[attn + "kv_b_proj.weight"]  # [N*(nope+v), R]
    np.testing.assert_array_equal(read("attn.wkv_b"), kv_b.reshape(n, nope + v, r).transpose(2, 0, 1))
    np.testing.assert_array_equal(read("attn.wkv_a"), stored[attn + "kv_a_proj_with_mqa.weight"].T)
    np.testing.assert_array_equal(read("attn.kv_a_norm"), stored[attn + "kv_a_layernorm.weight"])
    o = stored[attn + "o_proj.weight"]  # [D, N*v]
    np.testing.assert_array_equal(read("attn.wo"), o.T.reshape(n, v, -1))
    biases = {"attn.bkv_a": "kv_a_proj_with_mqa.bias", "attn.bo": "o_proj.bias"}
    if cfg.q_lora_rank:
        biases["attn.bq_a"] = "q_a_proj.bias"
    for canonical, hf_name in biases.items():
        assert (canonical in source.canonical) == cfg.qkv_bias
        if cfg.qkv_bias:
            np.testing.assert_array_equal(read(canonical), stored[attn + hf_name])


def test_olmoe_qk_norms_span_all_heads(checkpoints):
    """OLMoE's q_norm.weight [N*H] / k_norm.weight [K*H] -> canonical [N, H] / [K, H] (qk_norm_scope "all")."""
    source = HFSource(checkpoints["olmoe"])
    stored = load_file(checkpoints["olmoe"] / ST)
    cfg = source.cfg
    assert cfg.qk_norm_scope == "all"
    q = source.read("attn.q_norm", 1, _full(source, "attn.q_norm"))
    k = source.read("attn.k_norm", 1, _full(source, "attn.k_norm"))
    assert q.shape == (cfg.num_heads, cfg.head_dim) and k.shape == (cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(q.ravel(), stored["model.layers.1.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(k.ravel(), stored["model.layers.1.self_attn.k_norm.weight"])


def test_gpt_oss_interleaved_experts_read_as_even_and_odd_columns(checkpoints, monkeypatch):
    """gate_up_proj [E, D, 2F]: gate = [..., ::2], up = [..., 1::2] (not transposed); its bias [E, 2F] likewise;
    down_proj [E, F, D] and its bias as stored. Read whole and in random slices, in pieces of ~100 bytes."""
    source = HFSource(checkpoints["gpt_oss"])
    stored = load_file(checkpoints["gpt_oss"] / ST)
    layer = 2
    experts = f"model.layers.{layer}.mlp.experts."
    gate_up, gate_up_bias = stored[experts + "gate_up_proj"], stored[experts + "gate_up_proj_bias"]
    assert np.abs(gate_up_bias).max() > 0.1 and np.abs(stored[experts + "down_proj_bias"]).max() > 0.1
    expected = {"moe.wg": gate_up[..., ::2], "moe.wu": gate_up[..., 1::2], "moe.bg": gate_up_bias[:, ::2],
                "moe.bu": gate_up_bias[:, 1::2], "moe.wd": stored[experts + "down_proj"],
                "moe.bd": stored[experts + "down_proj_bias"],
                "moe.router": stored[f"model.layers.{layer}.mlp.router.weight"].T,
                "moe.router_bias": stored[f"model.layers.{layer}.mlp.router.bias"],
                "attn.sinks": stored[f"model.layers.{layer}.self_attn.sinks"]}
    monkeypatch.setattr(hf, "READ_BYTES", 100)
    rng = np.random.default_rng(0)
    for name, want in expected.items():
        assert source.canonical[name][0] == want.shape, name
        np.testing.assert_array_equal(source.read(name, layer, _full(source, name)), want, err_msg=name)
        for _ in range(4):
            index = tuple(slice(int(a), int(b) + 1) for a, b in (sorted(rng.integers(0, n, 2)) for n in want.shape))
            np.testing.assert_array_equal(source.read(name, layer, index), want[index], err_msg=name)


@pytest.mark.parametrize("name", NEW + list(hf_models.VARIANTS))
def test_writer_inverts_the_reader(name, checkpoints):
    """`hf.hf_tensors` (the demo writer) of what the reader reads is the checkpoint itself: same names (the family's
    default export is what transformers saves), same values (fused gpt-oss tensors filled from their parts)."""
    source = HFSource(checkpoints[name])
    written = hf.hf_tensors(source.cfg, lambda n, layer: source.read(n, layer, _full(source, n)))
    stored = load_file(checkpoints[name] / ST)
    assert sorted(written) == sorted(stored)
    for key, value in stored.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "olmoe"])
def test_fused_experts_read_as_per_expert_ones(name, hf_checkpoints, tmp_path):
    """transformers' in-memory names (`experts.gate_up_proj` [E, 2F, D] gate rows first, `down_proj` [E, D, F]),
    as some hub checkpoints store them, read as the per-expert tensors save_pretrained writes."""
    path, model = hf_checkpoints[name]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = {k: v.contiguous().numpy() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / ST)
    fused, per_expert = HFSource(tmp_path), HFSource(path)
    for canonical in ("moe.wg", "moe.wu", "moe.wd"):
        for layer in fused.canonical[canonical][1]:
            index = (slice(1, 7), *(slice(None),) * 2)
            np.testing.assert_array_equal(fused.read(canonical, layer, index), per_expert.read(canonical, layer, index))


# ---- refused or skipped ---------------------------------------------------------------------------------------


MISSING = {"deepseek_v3": "model.layers.2.mlp.gate.e_score_correction_bias",
           "deepseek_v3_no_q_lora": "model.layers.1.self_attn.q_proj.weight",
           "glm4_moe": "model.layers.0.mlp.gate_proj.weight",
           "olmoe": "model.layers.1.self_attn.q_norm.weight",
           "gpt_oss": "model.layers.3.mlp.experts.gate_up_proj_bias"}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_tensor_is_named(name, checkpoints, tmp_path):
    ckpt = _copy(checkpoints[name], tmp_path / "ckpt", edit=lambda t: t.pop(MISSING[name]))
    with pytest.raises(CheckpointError, match=rf"missing tensor {re.escape(MISSING[name])} \(expected shape"):
        HFSource(ckpt)


def _mtp_layer(tensors, layer, hidden=48):
    """Tensors of a DeepSeek-style multi-token-prediction layer `layer` (a few of its kinds)."""
    prefix = f"model.layers.{layer}."
    tensors |= {prefix + "enorm.weight": np.ones(hidden, np.float32),
                prefix + "hnorm.weight": np.ones(hidden, np.float32),
                prefix + "eh_proj.weight": np.zeros((hidden, 2 * hidden), np.float32),
                prefix + "shared_head.norm.weight": np.ones(hidden, np.float32),
                prefix + "self_attn.o_proj.weight": np.zeros((hidden, 5), np.float32),
                prefix + "mlp.experts.0.up_proj.weight": np.zeros((3, hidden), np.float32)}


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_mtp_layer_is_skipped_with_a_notice(name, checkpoints, tmp_path):
    """num_nextn_predict_layers=1: `model.layers.4.*` (4 = num_hidden_layers) is the MTP layer, skipped."""
    ckpt = _copy(checkpoints[name], tmp_path / "ckpt", edit=lambda t: _mtp_layer(t, 4))
    assert json.loads((ckpt / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match=r"skipped 6 tensors of the multi-token-prediction layer\(s\) "
                                         r"\(model\.layers\.4; kept in the checkpoint for speculative decoding"):
        source = HFSource(ckpt)
    assert "model.layers.4.enorm.weight" not in source.expected()
    np.testing.assert_array_equal(source.read("embed", None, (slice(0, 3), slice(None))),
                                  HFSource(checkpoints[name]).read("embed", None, (slice(0, 3), slice(None))))


@pytest.mark.parametrize("name,layer,config", [
    ("deepseek_v3", 5, None),  # beyond the one MTP layer the config declares
    ("glm4_moe", 4, lambda c: c.update(num_nextn_predict_layers=0)),  # the config declares none
    ("olmoe", 3, None),  # a family without MTP layers
])
def test_layers_after_the_last_are_unexpected_unless_mtp(name, layer, config, checkpoints, tmp_path):
    ckpt = _copy(checkpoints[name], tmp_path / "ckpt", edit=lambda t: _mtp_layer(t, layer), config=config)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor model\.layers\.{layer}\.eh_proj\.weight"):
        HFSource(ckpt)


@pytest.mark.parametrize("name,method", [("deepseek_v3", "gptq"), ("glm4_moe", "bitsandbytes"), ("olmoe", "awq"),
                                         ("gpt_oss", "hqq")])
def test_quantized_checkpoint_is_refused_by_name(name, method, checkpoints, tmp_path):
    ckpt = _copy(checkpoints[name], tmp_path / "ckpt",
                 config=lambda c: c.update(quantization_config={"quant_method": method}))
    with pytest.raises(CheckpointError, match=rf"config {re.escape(str(ckpt / 'config.json'))}: quantization_config "
                                              rf"\(quant_method '{method}'\) is not supported"):
        HFSource(ckpt)


def test_every_runtime_family_has_a_table():
    from moejax.config import RUNTIME_FAMILIES

    assert sorted(families.FAMILIES) == sorted(RUNTIME_FAMILIES)
