"""Every supported family through the planner: real config.json files (built offline with transformers' config
classes and the published values), the built-in YAML configs that mirror them, KV bytes per family, sliding
windows per layer."""

import json
import math

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner import cli
from moejax.planner.hardware import load_hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import kv_bytes_per_token_layer, memory_fit, param_counts, stages, stored_config
from moejax.planner.serving import features
from moejax.planner.workload import Options, Workload

transformers = pytest.importorskip("transformers")

# The published config.json values (sources cited in the YAML configs named beside them), as keyword arguments
# of transformers' config classes; `quantization_config` as the published files carry it.
PUBLISHED = {
    "deepseek_v3": ("DeepseekV3Config", "deepseek-v3", dict(
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]})),
    "glm4_moe": ("Glm4MoeConfig", "glm-4.5-air", dict(
        head_dim=128, attention_bias=True, partial_rotary_factor=0.5, rope_theta=1000000.0, use_qk_norm=False)),
    "gpt_oss": ("GptOssConfig", "gpt-oss-20b", dict(
        num_hidden_layers=24, num_local_experts=32, quantization_config={"quant_method": "mxfp4"})),
    "olmoe": ("OlmoeConfig", "olmoe-1b-7b", dict(intermediate_size=1024, clip_qkv=None)),
    "mixtral": ("MixtralConfig", "mixtral-8x7b", dict(max_position_embeddings=32768, rope_theta=1e6,
                                                      rms_norm_eps=1e-5)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3-30b-a3b", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1e6)),
    "qwen2_moe": ("Qwen2MoeConfig", None, dict()),  # Qwen1.5-MoE-A2.7B, the class's defaults
}


def hf_config(family: str) -> dict:
    """The config.json dict of `family`'s published model, as transformers writes it."""
    cls, _, kwargs = PUBLISHED[family]
    out = getattr(transformers, cls)(**kwargs).to_dict()
    if family == "qwen3_moe":  # the published file spells it num_experts; transformers 5 writes num_local_experts
        out["num_experts"] = out.pop("num_local_experts")
    return out


def _without_quantization(hf: dict) -> dict:
    return {k: v for k, v in hf.items() if k != "quantization_config"}


@pytest.mark.parametrize("family", [f for f, (_, name, _) in PUBLISHED.items() if name])
def test_yaml_configs_are_the_published_config_json(family):
    """The built-in YAML config reads as `ModelConfig.from_hf` reads the published config.json: field for field."""
    name = PUBLISHED[family][1]
    from_json = load_model_config(_without_quantization(hf_config(family)))
    assert from_json.replace(name=name) == load_model_config(name)


# (total, active) parameters as published; GLM counts active parameters without the embedding and LM head,
# OpenAI (gpt-oss) with the LM head but without the embedding lookup.
PUBLISHED_SIZES = {"glm-4.5-air": (106e9, 12e9, ("embed", "unembed")), "gpt-oss-20b": (20.9e9, 3.6e9, ("embed",)),
                   "olmoe-1b-7b": (6.9e9, 1.3e9, ())}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_new_model_sizes_match_published(name):
    counts = param_counts(load_model_config(name))
    total, active, excluded = PUBLISHED_SIZES[name]
    assert counts.total == pytest.approx(total, rel=0.015)
    assert counts.active - sum(getattr(counts, part) for part in excluded) == pytest.approx(active, rel=0.03)


@pytest.mark.parametrize("family", sorted(PUBLISHED))
@pytest.mark.parametrize("as_folder", [False, True], ids=["config.json", "checkpoint-folder"])
def test_plan_reads_every_family_s_config_json(family, as_folder, tmp_path, capsys):
    """`moejax plan --model DIR/config.json` (and `--model DIR`) for each family, quantization_config and all."""
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(family)))
    model = folder if as_folder else folder / "config.json"
    argv = ["--model", str(model), "--hardware", "h200", "--devices", "8", "--batch-sizes", "1,32",
            "--chunk-sizes", "512", "--isl", "512", "--osl", "64", "--precision", "fp8", "--json", "--no-plot",
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["summary"]["model"] == family and obj["summary"]["count"]["layouts_valid"] >= 1
    assert obj["ranking"] and all(row["tpot_s"] > 0 and math.isfinite(row["tpot_s"]) for row in obj["ranking"])


def test_plan_names_a_malformed_config_json(tmp_path, capsys):
    hf = _without_quantization(hf_config("deepseek_v3")) | {"quantization_config": {"quant_method": "fp8"}}
    del hf["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert cli.main(["--model", str(tmp_path), "--hardware", "h200", "--devices", "8", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: model config") and "missing key 'kv_lora_rank'" in err


# ---- KV bytes per family ----------------------------------------------------------------------------------

# Bytes per token per layer at bf16, by hand: GQA 2 K H x 2, MLA (kv_lora + rope) x 2.
KV_BY_HAND = {"deepseek-v3": (512 + 64) * 2, "glm-4.5-air": 2 * 8 * 128 * 2, "gpt-oss-20b": 2 * 8 * 64 * 2,
              "olmoe-1b-7b": 2 * 16 * 128 * 2, "mixtral-8x7b": 2 * 8 * 128 * 2, "qwen3-30b-a3b": 2 * 4 * 128 * 2}


@pytest.mark.parametrize("name", sorted(KV_BY_HAND))
def test_kv_bytes_per_token_are_the_config_s_formula(name):
    cfg, w = load_model_config(name), Workload(kv_precision="bf16")
    assert kv_bytes_per_token_layer(cfg, Layout(), w) * cfg.num_layers == cfg.kv_bytes_per_token(2)
    assert kv_bytes_per_token_layer(cfg, Layout(), w) == KV_BY_HAND[name]
    scales = 4 * (1 if cfg.attention == "mla" else 2 * cfg.num_kv_heads)  # a float32 scale per token (and kv head)
    assert kv_bytes_per_token_layer(cfg, Layout(), Workload(kv_precision="fp8")) == KV_BY_HAND[name] / 2 + scales
    for t in (2, 8, 16):
        sized = stored_config(cfg, Layout(tensor=t))  # the cost model's view: kv heads replicated up to TP
        split = kv_bytes_per_token_layer(sized, Layout(tensor=t), w)
        assert split == kv_bytes_per_token_layer(cfg, Layout(tensor=t), w)
        if cfg.attention == "mla":  # the latent serves every head: each TP rank holds all of it
            assert split == KV_BY_HAND[name]
        else:  # kv heads split over tensor, one per device at least
            assert split == KV_BY_HAND[name] * max(cfg.num_kv_heads, t) / cfg.num_kv_heads / t


def test_sliding_window_caps_only_the_windowed_layers():
    """gpt-oss-20b: the 12 even layers hold at most 128 positions, the 12 odd ones the whole context."""
    cfg, hw = load_model_config("gpt-oss-20b"), load_hardware("h200")
    w = Workload(isl=4000, osl=96)  # 4096 positions at full context
    fit = memory_fit(cfg, Layout(), hw, w, Options(), batch=4, chunk=512)
    per_token = 2 * 8 * 64 * 2
    assert fit.kv_cache == 4 * (12 * 128 + 12 * 4096) * per_token
    every = cfg.replace(sliding_layers=None)  # a window on every layer (Mixtral-style)
    assert memory_fit(every, Layout(), hw, w, Options(), batch=4, chunk=512).kv_cache == 4 * 24 * 128 * per_token
    none = cfg.replace(sliding_window=None, sliding_layers=None)
    assert memory_fit(none, Layout(), hw, w, Options(), batch=4, chunk=512).kv_cache == 4 * 24 * 4096 * per_token


def test_pipeline_stages_hold_their_own_layers_windows():
    """PP8 over gpt-oss's 24 layers: stages of layers 0-2 (two windowed), 3-5 (one), ... The heaviest stage holds
    two full-context layers; stage shapes that differ only in their windows are costed apart."""
    cfg, hw = load_model_config("gpt-oss-20b"), load_hardware("h200")
    w, lay = Workload(isl=4000, osl=96), Layout(stage=8)
    fit = memory_fit(cfg, lay, hw, w, Options(), batch=1, chunk=512)
    assert fit.kv_cache == (1 * 128 + 2 * 4096) * 2 * 8 * 64 * 2
    assert [s.start for s in stages(cfg, lay)] == [0, 3, 6, 9, 12, 15, 18, 21]
    f = features(cfg, lay, hw, w, Options(), batch=8, chunk=512)
    assert int(f["valid"][0].sum()) == 4  # (first, middle even, middle odd, last) stages
    attn = f["attn_bytes"][1][f["valid"][1] > 0]
    assert len(set(attn.tolist())) == 2  # decode KV reads: two windowed layers of three, or one


def test_new_families_plan_end_to_end_in_memory_and_cost():
    """Dense first layers, shared experts, MLA and gpt-oss's windows change bytes and FLOPs where they should."""
    hw, w = load_hardware("h200"), Workload(isl=1024, osl=128, precision="fp8")
    glm = load_model_config("glm-4.5-air")
    first, rest = stages(glm, Layout(stage=2))
    assert (first.dense_layers, first.moe_layers, rest.dense_layers) == (1, 22, 0)
    sized = stored_config(glm, PlanLayout.of("TP8"))
    assert sized.dense_intermediate_size == 10944 and sized.shared_expert_intermediate_size == 1408
    odd = glm.replace(dense_intermediate_size=10946)  # padded to a multiple of TP as the runtime pads it
    assert stored_config(odd, PlanLayout.of("TP4")).dense_intermediate_size == 10948
    for name in ("deepseek-v3", "glm-4.5-air", "gpt-oss-20b", "olmoe-1b-7b"):
        cfg = load_model_config(name)
        fit = memory_fit(cfg, Layout(tensor=8), hw, w, Options(), batch=8, chunk=512)
        assert fit.weights > 0 and fit.kv_cache > 0 and fit.workspace > 0
