"""Quantized checkpoints as published (`moejax.checkpoint.quantized`): FP8 block-scaled, MXFP4 (gpt-oss experts),
compressed-tensors FP8 / INT8 per channel.

Each is loaded as stored (values in their narrow type, scales beside them) and must equal transformers running the
dequantized weights in float32 (the twin `tests.quantized_checkpoints.quantize` writes, dequantized there
independently of the loader) on every layout kind, with blocks partial at the edges and cut by tensor-parallel
shards. Bad scales, dropped scales and unsupported formats are refused by name.
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest

import moejax
from moejax.checkpoint.hf import CheckpointError, HFSource
from moejax.checkpoint.safetensors_files import tensor_files
from tests import hf_models
from tests.quantized_checkpoints import ST, quantize

IDS = np.random.default_rng(0).integers(0, 128, (2, 12))
# Blocks of 16 x 24: partial at the edges of every dim that is not a multiple (o_proj's 128 inputs, kv_b's 16,
# the 32-wide expert FFN) and cut by the tensor shards (an expert FFN of 32 split in two: tiles of 8).
BLOCK = (16, 24)
# (name, float checkpoint family, method, weight kind, layouts): a layout of every kind over the formats
CASES = {
    "deepseek-fp8": ("deepseek_v3", "fp8", "float", ("DP1", "TP2")),
    "mixtral-fp8": ("mixtral", "fp8", "float", ("TP4", "PP2", "DP2EP2")),
    "qwen3-ct-fp8": ("qwen3_moe", "compressed-tensors", "float", ("DP1", "TP2EP2")),
    "mixtral-ct-int8": ("mixtral", "compressed-tensors", "int", ("TP2",)),
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4", "float", ("DP1", "TP2EP2")),
}
DEFAULT = {("deepseek-fp8", "TP2"), ("gpt_oss-mxfp4", "TP2EP2"), ("mixtral-ct-int8", "TP2")}  # the rest: -m slow
# The table in docs/benchmarks.md: pytest tests/test_quantized_checkpoints.py -k "matches or memory" -m "slow or not
# slow" -s


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """case -> (quantized checkpoint, transformers logits of its dequantized twin), built on first use."""
    import torch
    from transformers import AutoModelForCausalLM

    root, memo = tmp_path_factory.mktemp("quantized"), {}

    def get(case):
        if case not in memo:
            family, method, kind, _ = CASES[case]
            src = root / f"{family}-float"
            if not src.exists():  # MXFP4 blocks are 32 wide: gpt-oss with hidden size 64
                hf_models.build(family, src, **({"hidden_size": 64} if family == "gpt_oss" else {}))
            q, twin = quantize(src, root / case, method, block=BLOCK, kind=kind)
            ref = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32, attn_implementation="eager")
            memo[case] = (q, hf_models.hf_logits(ref, IDS))
        return memo[case]

    return get


def _params():
    return [pytest.param(case, layout, marks=() if (case, layout) in DEFAULT else pytest.mark.slow,
                         id=f"{case}-{layout}") for case in CASES for layout in CASES[case][3]]


@pytest.mark.parametrize("case,layout", _params())
def test_published_format_matches_the_dequantized_reference(case, layout, quantized):
    path, want = quantized(case)
    model = moejax.load(path, layout=layout)
    assert model.quantization is not None and model.quantization.stored
    got = model.forward(IDS)
    print(f"| {case} | {model.quantization.describe()} | {layout} | {np.abs(got - want).max():.1e} |")  # with -s
    # float32 rounding only (measured <= 1e-5 over every case): the dequantization is exact
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{case} {layout}")


@pytest.mark.parametrize("case,dtype", [("deepseek-fp8", ml_dtypes.float8_e4m3fn),
                                        ("gpt_oss-mxfp4", ml_dtypes.float4_e2m1fn),
                                        ("mixtral-ct-int8", np.int8)])
def test_values_stay_in_their_stored_type(case, dtype, quantized):
    path, _ = quantized(case)
    source = HFSource(path)
    model = moejax.load(path, layout="TP2")
    params = model.steps.params["layers"]
    expected = {"deepseek-fp8": ["attn", "moe"], "gpt_oss-mxfp4": ["moe"], "mixtral-ct-int8": ["attn", "moe"]}[case]
    for block in expected:
        for name, value in params[block].items():
            if f"{block}.{name}" in source.quantized and name != "wkv_b":  # MLA keeps kv_b float (absorbed)
                assert value["values"].dtype == dtype, (case, name)
                assert value["scale"].dtype == np.float32
    if case == "deepseek-fp8":  # stored fp8, read dequantized into the float weight the model absorbs
        assert "attn.wkv_b" in source.quantized and not isinstance(params["attn"]["wkv_b"], dict)
    if case == "gpt_oss-mxfp4":  # the attention is stored in bf16/f32 and stays float
        assert not isinstance(params["attn"]["wq"], dict)
        assert sorted(source.quantized) == ["moe.wd", "moe.wg", "moe.wu"]
    # scales per tile: the expert down-projection contracts the FFN (32): blocks of 24 cut by the TP2 shards
    # (16 each) are tiled by gcd(24, 16) = 8; MXFP4 tiles its 32-blocks whole (16 per shard: gcd 16)
    if case == "deepseek-fp8":
        wd = params["moe"]["wd"]
        assert wd["values"].shape[-2] // wd["scale"].shape[-2] == 8


def _edit(path, tmp_path, edit_tensors=None, edit_config=None):
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(path, dst)
    if edit_tensors:  # safetensors' numpy reader knows no float8: read and write through torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(dst / ST)
        edit_tensors(tensors)
        save_file(tensors, dst / ST)
    if edit_config:
        data = json.loads((dst / "config.json").read_text())
        edit_config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


SCALE = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"


@pytest.mark.parametrize("bad", [0.0, np.inf, np.nan, -1.0])
def test_bad_scale_is_refused_with_the_tensor_named(bad, quantized, tmp_path):
    path, _ = quantized("deepseek-fp8")

    edited = _edit(path, tmp_path)
    entry = tensor_files(edited)[SCALE]  # F32: overwrite its first scale in place
    with open(entry.file, "r+b") as f:
        f.seek(entry.offset)
        f.write(np.float32(bad).tobytes())
    with pytest.raises(CheckpointError, match=rf"scale tensor {re.escape(SCALE)}.*invalid scale"):
        moejax.load(edited, layout="DP1")


def test_dropped_scales_are_refused(quantized, tmp_path):
    """An FP8 export whose scales were dropped would load silently wrong: its FP8 tensors are refused by name."""
    path, _ = quantized("deepseek-fp8")
    weight = "model.layers.1.self_attn.q_b_proj.weight"
    one = _edit(path, tmp_path / "a", lambda t: t.pop(weight + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"missing tensor {re.escape(weight)}_scale_inv \(expected shape "
                                              rf"\(12, 1\)\)"):
        HFSource(one)
    every = _edit(path, tmp_path / "c", lambda t: [t.pop(n) for n in list(t) if n.endswith("_scale_inv")])
    with pytest.raises(CheckpointError, match=r"has dtype F8_E4M3, which is not a floating type, and it has no scale "
                                              r"tensor .*weight_scale_inv"):
        HFSource(every)
    no_config = _edit(path, tmp_path / "b", edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="F8_E4M3, which is not a floating type, and the config declares no "
                                              "quantization_config"):
        HFSource(no_config)


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "awq", "bits": 4}, r"quant_method 'awq'.*not supported"),
    ({"quant_method": "gptq"}, r"quant_method 'gptq'.*not supported"),
    ({"quant_method": "fp8", "fmt": "e4m3"}, r"weight_block_size None"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, r"fmt 'e5m2'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "symmetric": True}}}}, r"int 4-bit group"),
])
def test_unsupported_quantization_config_is_refused_by_name(qc, message, quantized, tmp_path):
    path, _ = quantized("deepseek-fp8")
    edited = _edit(path, tmp_path, edit_config=lambda c: c.update(quantization_config=qc))
    with pytest.raises(CheckpointError, match=message):
        HFSource(edited)


@pytest.mark.slow
def test_requantizing_a_quantized_checkpoint_reads_it_dequantized(quantized):
    """quantization= on a quantized checkpoint quantizes its dequantized weights again: int8 from the fp8 checkpoint
    is int8 from its dequantized float twin."""
    path, _ = quantized("deepseek-fp8")
    model = moejax.load(path, layout="DP1", quantization="int8")
    assert model.quantization == "int8"
    twin = moejax.load(path.parent / (path.name + "-dequantized"), layout="DP1", quantization="int8")
    np.testing.assert_allclose(model.forward(IDS), twin.forward(IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["deepseek-fp8", "gpt_oss-mxfp4"])
def test_convert_keeps_the_stored_precision(case, quantized, tmp_path, capsys):
    """moejax convert writes the values in their type and the scales one per tile; loaded back on a layout whose
    shards cut the tiles further, the model is the published one (the dequantized reference)."""
    from moejax.checkpoint.store import OrbaxSource
    from moejax.cli import main

    path, want = quantized(case)
    out = tmp_path / "ckpt"
    assert main(["convert", "--hf", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "weights as stored" in capsys.readouterr().out
    source = OrbaxSource(out)
    assert source.quantization == HFSource(path).quantization
    stored = {"deepseek-fp8": ml_dtypes.float8_e4m3fn, "gpt_oss-mxfp4": ml_dtypes.float4_e2m1fn}[case]
    for name in source.quantized:
        assert source._stores[name].dtype.numpy_dtype == stored, name
    model = moejax.load(out, layout="TP2")
    assert model.quantization.stored
    np.testing.assert_allclose(model.forward(IDS), want, atol=1e-4, rtol=0)


# Weight memory as stored, measured on the placed arrays against the planner (bfloat16 serving, 128 x 128 FP8
# blocks and MXFP4 at widths where the blocks are whole: hidden 256, FFN 256). Printed with -s:
#   pytest tests/test_quantized_checkpoints.py -k memory -s
MEMORY = {"deepseek_v3": ("fp8", "fp8", "DP1"), "qwen3_moe": ("fp8", "fp8", "TP2EP2"),
          "gpt_oss": ("mxfp4", "mxfp4", "TP2EP2"), "mixtral": ("compressed-tensors", "int8", "TP2")}


@pytest.mark.parametrize("family", list(MEMORY))
def test_stored_weight_memory_matches_the_planner(family, tmp_path):
    from moejax.bench.quant import measured_weight_bytes
    from moejax.mesh import Layout
    from moejax.planner.memory import weights_per_device
    from moejax.planner.workload import Workload

    method, precision, layout = MEMORY[family]
    wide = {"deepseek_v3": dict(moe_intermediate_size=256, intermediate_size=256, q_lora_rank=128, kv_lora_rank=128),
            "qwen3_moe": dict(moe_intermediate_size=256, intermediate_size=256)}.get(family,
                                                                                    dict(intermediate_size=256))
    hf_models.build(family, tmp_path / "float", hidden_size=256, **wide)
    path, _ = quantize(tmp_path / "float", tmp_path / "q", method, block=(128, 128), kind="int")
    model = moejax.load(path, layout=layout, dtype="bfloat16")
    measured = measured_weight_bytes(model)
    planned = weights_per_device(model.cfg, Layout.parse(layout), Workload(precision=precision))
    print(f"| {family} | {model.quantization.describe()} | {layout} | {measured / 2**20:.3f} MiB | "
          f"{planned / 2**20:.3f} MiB | {planned / measured - 1:+.1%} |")
    # the planner leaves out norms and biases (and counts fp8 scales per channel, not per 128-block): a few %
    assert abs(planned / measured - 1) <= 0.05, (measured, planned)
