"""Quantized Hugging Face checkpoints as published, written from a float one (tests only), and their dequantized
float twin (the reference transformers runs).

`quantize(src, dst, method, ...)` writes `dst` in one of the published formats (`moejax.checkpoint.quantized`):
"fp8" (F8_E4M3 weights with `weight_scale_inv` block scales, partial edge blocks where a dim is not a multiple of
the block), "mxfp4" (gpt-oss experts: packed e2m1 `_blocks` with E8M0 `_scales`), "compressed-tensors" (FP8 or
INT8 per output channel, `weight_scale`), and `dst.parent / (dst.name + "-dequantized")`: the same checkpoint in
float32 with every quantized weight replaced by values x scales, computed here independently of the loader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

ST = "model.safetensors"
# torch Linear weights quantized by the published formats: attention projections, experts, shared/dense MLPs
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o|q_a|q_b|kv_a|kv_b)_proj(_with_mqa)?|"
                     r"mlp\.(experts\.\d+\.|shared_experts?\.)?(gate|up|down)_proj|"
                     r"(block_sparse_moe|mlp)\.experts\.\d+\.w[123])\.weight$")
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def quantize(src: Path, dst: Path, method: str, block=(16, 16), kind: str = "float") -> tuple[Path, Path]:
    """(quantized checkpoint, its dequantized float32 twin) from float checkpoint `src`."""
    tensors = {k: np.asarray(v, np.float32) for k, v in load_file(src / ST).items()}
    config = json.loads((src / "config.json").read_text())
    out, ref = {}, {}
    for name, w in tensors.items():
        if method == "mxfp4" and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales, deq = _mxfp4(np.swapaxes(w, 1, 2))  # [E, in, out] -> torch's [E, out, in]
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
            ref[name] = np.ascontiguousarray(np.swapaxes(deq, 1, 2))
        elif method != "mxfp4" and _LINEAR.match(name) and w.ndim == 2:
            if method == "fp8":
                values, scale, deq = _blocked(w, block, ml_dtypes.float8_e4m3fn, 448.0)
                out[name], out[name + "_scale_inv"] = values, scale
            else:
                dtype, top = (ml_dtypes.float8_e4m3fn, 448.0) if kind == "float" else (np.int8, 127.0)
                values, scale, deq = _blocked(w, (1, w.shape[1]), dtype, top)
                out[name], out[name[: -len("weight")] + "weight_scale"] = values, scale
            ref[name] = deq
        else:
            out[name] = ref[name] = w
    config["quantization_config"] = _config(method, block, kind)
    for path, data, cfg in ((dst, out, config), (dst.parent / (dst.name + "-dequantized"), ref, None)):
        path.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(path / ST))  # it writes raw memory
        for extra in src.iterdir():
            if extra.name not in (ST, "config.json"):
                shutil.copy(extra, path / extra.name)
        plain = {k: v for k, v in json.loads((src / "config.json").read_text()).items()}
        (path / "config.json").write_text(json.dumps(cfg if cfg is not None else plain))
    return dst, dst.parent / (dst.name + "-dequantized")


def _config(method: str, block, kind: str) -> dict:
    if method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    if method == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp"
                                                                    ".router", "model.embed_tokens", "lm_head"]}
    return {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": kind, "strategy": "token", "dynamic": True}}}}


def _blocked(w: np.ndarray, block, dtype, top: float):
    """(values, scales [ceil(out/bo), ceil(in/bi)], dequantized) of a [out, in] matrix, absmax per block."""
    bo, bi = block
    rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    scale = np.ones((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            amax = np.abs(w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]).max()
            scale[i, j] = amax / top if amax > 0 else 1.0
    full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[: w.shape[0], : w.shape[1]]
    x = w / full
    values = (np.clip(np.round(x), -127, 127) if dtype == np.int8 else x).astype(dtype)
    return values, scale, values.astype(np.float32) * full


def _mxfp4(w: np.ndarray):
    """(blocks U8 [..., out, in/32, 16], scales U8 [..., out, in/32], dequantized) of [..., out, in]."""
    *lead, out, cols = w.shape
    g = w.reshape(*lead, out, cols // 32, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
    x = g / np.ldexp(np.float32(1), exp)
    codes = np.abs(x[..., None] - FP4).argmin(-1).astype(np.uint8)  # nearest e2m1 value
    deq = FP4[codes] * np.ldexp(np.float32(1), exp)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exp[..., 0] + 127).astype(np.uint8), deq.reshape(w.shape).astype(np.float32)
