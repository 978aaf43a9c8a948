"""Quantized Hugging Face checkpoints as published: the formats the loader reads, and how each stores a weight.

A quantized matmul weight is two stored tensors: its values, a matrix [out, in] (one per expert) in a narrow
type, and its scales, one per block of the matrix; dequantized, element (o, i) is value(o, i) * scale(o // bo,
i // bi). Formats (`quantization_config.quant_method`):

- "fp8" (DeepSeek-V3/R1, Qwen3-FP8, GLM-4.5-FP8: transformers' fine-grained FP8): `X.weight` F8_E4M3 [out, in]
  and `X.weight_scale_inv` F32 [ceil(out / bo), ceil(in / bi)], `weight_block_size` [bo, bi] (128 x 128);
  the last block of a dim that is not a multiple of the block is partial.
- "mxfp4" (gpt-oss: the routed experts): `X_blocks` U8 [E, out, in / 32, 16], two e2m1 codes per byte (low
  nibble first), and `X_scales` U8 [E, out, in / 32], E8M0 exponents (scale 2^(s - 127)): blocks of 1 x 32.
- "compressed-tensors" (llm-compressor), FP8 or INT8 weights, symmetric, channel or tensor strategy:
  `X.weight` F8_E4M3 / I8 [out, in] and `X.weight_scale` [out, 1] (channel) or [1] (tensor).

Which canonical tensors a checkpoint stores quantized is read from the files (the ones with a scale tensor;
the rest, as `modules_to_not_convert` / `ignore` say, are float). The loader keeps values and scales as stored
(`moejax.quant.Scheme(stored=True)`); a tensor the model keeps in float (MLA's kv up-projection) is read
dequantized. Any other quantization_config is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moejax.checkpoint.safetensors_files import CheckpointError
from moejax.config import CHECKPOINT_QUANT_METHODS as METHODS

MXFP4_BLOCK = 32


@dataclass(frozen=True)
class Format:
    """How one checkpoint stores its quantized weights (see the module doc)."""

    method: str
    precision: str  # the values' type: "fp8" | "int8" | "fp4" (the planner's weight precision)
    block: tuple[int, int] | None  # stored (rows, cols) per scale; None: the scale's own shape says (channel/tensor)
    values_dtype: str  # safetensors dtype of the values
    scale_suffix: tuple[str, str]  # values-name suffix -> scale-name suffix

    @property
    def qtype(self):
        return {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8, "fp4": jnp.float4_e2m1fn}[self.precision]

    def describe(self) -> str:
        blocks = f" blocks of {self.block[0]}x{self.block[1]}" if self.block else " per output channel"
        return f"{self.method} ({self.precision}{blocks})"

    def scale_name(self, values_name: str) -> str:
        old, new = self.scale_suffix
        return values_name[: -len(old)] + new if values_name.endswith(old) else values_name + new

    # ---- shapes -------------------------------------------------------------------------------

    def values_shape(self, matrix: tuple[int, ...]) -> tuple[int, ...]:
        """Stored values' shape for a stored float matrix shape [..., out, in]."""
        if self.method == "mxfp4":
            *lead, out, cols = matrix
            return (*lead, out, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2)
        return tuple(matrix)

    def matrix(self, values: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) of elements of one stored values matrix of shape `values`."""
        if self.method == "mxfp4":
            return values[0], int(np.prod(values[1:])) * 2
        return values[0], int(np.prod(values[1:]))

    def scale_shapes(self, matrix: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Allowed stored scale shapes for a stored float matrix shape [..., out, in]."""
        *lead, out, cols = matrix
        if self.block is not None:
            bo, bi = self.block
            return [(*lead, -(-out // bo), -(-cols // bi))]
        return [(*lead, out, 1), (*lead, out), (*lead, 1), tuple(lead)]  # channel or tensor

    def block_of(self, matrix: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) of the stored matrix each scale covers."""
        if self.block is not None:
            return self.block
        out, cols = matrix[-2:]
        per_channel = len(scale) > len(matrix) - 2 and scale[len(matrix) - 2] == out and out > 1
        return (1 if per_channel else out, cols)

    # ---- decoding -----------------------------------------------------------------------------

    def values(self, raw: np.ndarray) -> np.ndarray:
        """Stored rows -> element values [n, in] (the device's storage type)."""
        if self.method == "mxfp4":
            codes = np.empty((*raw.shape[:-1], raw.shape[-1] * 2), np.uint8)
            codes[..., 0::2], codes[..., 1::2] = raw & 0x0F, raw >> 4
            return codes.reshape(raw.shape[0], -1).view(ml_dtypes.float4_e2m1fn)
        return raw

    @staticmethod
    def scales(raw: np.ndarray) -> np.ndarray:
        """Stored scale rows -> float32 multipliers."""
        if raw.dtype == np.uint8:  # E8M0 exponents
            return np.ldexp(np.float32(1), raw.astype(np.int32) - 127).astype(np.float32)
        return raw.astype(np.float32)


def format_of(hf: dict[str, Any], where: str) -> Format | None:
    """The quantization format config.json `hf` declares (None: a float checkpoint); an unsupported one is a
    CheckpointError naming it."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"config {where}: quantization_config is a {type(qc).__name__}, not an object")
    method = qc.get("quant_method", "?")

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"config {where}: quantization_config (quant_method {method!r}) is not supported: "
                               f"{why}")

    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise refuse(f"fmt {qc.get('fmt')!r} (only e4m3)")
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise refuse(f"weight_block_size {block!r} (expected [rows, cols] of positive integers; per-tensor fp8 "
                         f"is read through compressed-tensors)")
        return Format("fp8", "fp8", (block[0], block[1]), "F8_E4M3", ("weight", "weight_scale_inv"))
    if method == "mxfp4":
        return Format("mxfp4", "fp4", (1, MXFP4_BLOCK), "U8", ("_blocks", "_scales"))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, refuse)
    raise refuse(f"the loader reads {', '.join(METHODS)} quantized checkpoints (and float ones)")


def _compressed_tensors(qc: dict[str, Any], refuse) -> Format:
    groups = qc.get("config_groups") or {}
    if qc.get("format") not in (None, "float-quantized", "int-quantized", "naive-quantized"):
        raise refuse(f"format {qc.get('format')!r} (packed formats are not read; float-quantized, int-quantized "
                     f"and naive-quantized are)")
    if len(groups) != 1:
        raise refuse(f"{len(groups)} config_groups (one group is read)")
    (group,) = groups.values()
    w = group.get("weights") or {}
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if bits != 8 or kind not in ("float", "int") or strategy not in ("channel", "tensor") \
            or not w.get("symmetric", True):
        raise refuse(f"weights {kind} {bits}-bit {strategy} (symmetric={w.get('symmetric', True)}); read: 8-bit "
                     f"float or int, symmetric, channel or tensor strategy")
    acts = group.get("input_activations")
    if acts and not acts.get("dynamic", False):
        raise refuse("static input-activation scales (the runtime quantizes weights only; dynamic or no "
                     "activation quantization is read)")
    precision = "fp8" if kind == "float" else "int8"
    return Format("compressed-tensors", precision, None, "F8_E4M3" if kind == "float" else "I8",
                  ("weight", "weight_scale"))


def check_scales(scale: np.ndarray, what: str) -> None:
    """Scales must be finite and positive: a zero, negative, inf or NaN scale is a CheckpointError naming the
    tensor (it would zero, flip or poison a block of the weight)."""
    ok = np.isfinite(scale) & (scale > 0)
    if not ok.all():
        bad = scale[~ok]
        raise CheckpointError(f"scale tensor {what} has {bad.size} invalid scale(s) (e.g. {bad.flat[0]!r}): scales "
                              f"must be finite and positive")
