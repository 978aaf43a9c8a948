"""Layouts, meshes, config loading and the clear errors for bad configs and checkpoints."""

import json
import shutil

import jax
import numpy as np
import pytest

import moejax
from moejax.checkpoint.hf import CheckpointError
from moejax.config import configs_dir, load_model_config
from moejax.mesh import Layout, make_mesh


def test_layout_parse_and_format_round_trip():
    layout = Layout.parse("DP2TP2EP2PP1")
    assert layout == Layout(data=2, tensor=2, expert=2, stage=1) and layout.size == 8
    assert Layout.parse("data=2,tensor=2,expert=2,stage=1") == layout
    assert Layout.parse("pp2ep4") == Layout(expert=4, stage=2)
    for text in ["DP8", "TP2EP16PP2", "DP1", "DP2TP2EP2"]:
        assert str(Layout.parse(text)) == text
        assert Layout.parse(str(Layout.parse(text))) == Layout.parse(text)


@pytest.mark.parametrize("bad", ["", "DP2XP2", "TP0", "DP2DP2", "data=2,bogus=1", "2DP"])
def test_layout_parse_errors(bad):
    with pytest.raises(ValueError):
        Layout.parse(bad)


def test_enumerate_lists_every_valid_layout():
    cfg = load_model_config("tiny-moe")  # 8 heads, 2 kv heads, 8 experts, 4 layers
    layouts = Layout.enumerate(8, cfg)
    assert all(layout.size == 8 and not layout.problems(cfg) for layout in layouts)
    assert {"DP8", "TP8", "EP8", "DP2TP2EP2", "TP2EP2PP2", "EP4PP2", "DP2EP4"} <= {str(x) for x in layouts}
    assert len(Layout.enumerate(8)) == 20  # ordered factorisations of 8 into 4 factors
    assert "PP8" not in {str(x) for x in layouts}  # 8 stages > 4 layers


def test_layout_validation_messages_name_the_numbers():
    cfg = load_model_config("tiny-moe").replace(num_heads=6, num_kv_heads=3, num_experts=6)
    with pytest.raises(ValueError, match=r"attention heads \(6\) must be divisible by tensor \(4\)"):
        Layout(tensor=4).validate(cfg)
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by expert \(4\)"):
        Layout(expert=4).validate(cfg)
    with pytest.raises(ValueError, match=r"stage \(8\) cannot exceed the number of layers \(4\)"):
        Layout(stage=8).validate(cfg)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide or be divisible by tensor \(2\)"):
        Layout(tensor=2).validate(cfg)
    # Vocabulary and FFN widths are padded per shard (exactness: tests/test_sharded_equivalence.py).
    assert not Layout(tensor=3).problems(cfg.replace(num_heads=6, num_kv_heads=3, vocab_size=97))


def test_mesh_uses_first_devices_and_rejects_too_many():
    mesh = make_mesh("DP1")
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    assert dict(make_mesh("TP2EP2PP2").shape) == {"data": 1, "tensor": 2, "expert": 2, "stage": 2}
    with pytest.raises(ValueError, match="needs 16 devices but only 8 are available"):
        make_mesh("DP16")


def test_every_yaml_config_loads():
    names = sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))
    assert "tiny-moe" in names
    for name in names:
        assert load_model_config(name).num_experts >= 1


def test_planner_only_models_are_rejected_by_the_runtime():
    cfg = load_model_config("tiny-moe").replace(family="gpt_moe")
    with pytest.raises(ValueError, match="cannot run in moejax yet.*family 'gpt_moe' is planner-only"):
        moejax.Model.random(cfg)


@pytest.mark.parametrize("model_type,lacks", [
    ("qwen3_next", "linear attention layers"), ("longcat_flash", "zero-compute experts"),
    ("jamba", "Mamba"), ("llama4_text", "NoPE layers")])
def test_unsupported_families_are_refused_naming_what_they_lack(model_type, lacks):
    with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported: .*{lacks}"):
        load_model_config({"model_type": model_type})


def _hf_dict(family: str, **overrides) -> dict:
    from tests import hf_models

    return {**hf_models.hf_config(family, **overrides).to_dict(), "model_type": family}


@pytest.mark.parametrize("field,value,message", [
    ("quantization_config", {"quant_method": "awq"}, "quantization_config .quant_method 'awq'. is not supported"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("mlp_only_layers", [1], "mlp_only_layers=.1. .dense FFN layers among the MoE layers. is not supported"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2 .MoE every few layers. is not supported"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_type 'longrope' is not supported"),
])
def test_config_fields_that_change_the_math_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        load_model_config({**_hf_dict("qwen2_moe"), field: value})


def test_kimi_k2_reads_as_deepseek_v3():
    hf = {**_hf_dict("deepseek_v3"), "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}
    assert load_model_config(hf).replace(name="") == load_model_config(_hf_dict("deepseek_v3")).replace(name="")


def test_qwen2_moe_layer_types_window_only_their_layers():
    """layer_types decides which layers slide (a probe once found every layer windowed: logits off by 4.2)."""
    hf = _hf_dict("qwen2_moe", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    cfg = load_model_config(hf)
    sliding = tuple(i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention")
    assert 0 < len(sliding) < cfg.num_layers
    assert cfg.sliding_window == 6 and cfg.sliding_layers == sliding
    assert [cfg.window_of(i) for i in range(cfg.num_layers)] == [6 if i in sliding else None
                                                                 for i in range(cfg.num_layers)]


def test_hf_config_translation(hf_checkpoints):
    cfg = load_model_config(hf_checkpoints["qwen2_moe"][0])
    assert (cfg.family, cfg.shared_expert_intermediate_size, cfg.shared_expert_gate, cfg.qkv_bias) == (
        "qwen2_moe", 40, True, True)
    assert load_model_config(hf_checkpoints["qwen3_moe"][0]).qk_norm
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_model_config({"model_type": "llama"})


@pytest.fixture()
def ckpt_copy(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints["mixtral"]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_checkpoint_missing_tensor(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.5.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.block_sparse_moe.experts.5.w2.weight "
                                              r"\(expected shape \(48, 32\)\)"):
        moejax.load(ckpt_copy)


def test_checkpoint_unexpected_tensor(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.0.extra.weight with shape \(3, 3\)"):
        moejax.load(ckpt_copy)


def test_checkpoint_wrong_shape(ckpt_copy):
    name = "model.layers.2.self_attn.q_proj.weight"
    _rewrite(ckpt_copy, lambda t: t.update({name: np.zeros((64, 48), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{name}: expected shape \(128, 48\), found \(64, 48\)"):
        moejax.load(ckpt_copy)


def test_checkpoint_sharded_with_index(ckpt_copy, models_1dev):
    """A checkpoint split over two files with model.safetensors.index.json loads the same weights."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt_copy / "model.safetensors")
    (ckpt_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, ckpt_copy / file)
        weight_map |= {n: file for n in part}
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = np.arange(12).reshape(1, 12)
    np.testing.assert_array_equal(moejax.load(ckpt_copy).forward(ids), models_1dev["mixtral"].forward(ids))


def test_out_of_vocabulary_ids_are_rejected_on_the_host(models_1dev):
    model = models_1dev["mixtral"]
    with pytest.raises(ValueError, match=r"Token id 128 is out of vocabulary \(vocab_size=128\)"):
        model.forward([[1, 128]])
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        model.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 cannot be empty"):
        model.generate([[1], []])
    with pytest.raises(ValueError, match=r"= 1030 exceeds the context limit max_model_len=1024"):
        model.generate([[1] * 1000], max_new_tokens=30)
