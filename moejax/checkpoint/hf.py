"""Hugging Face safetensors import for Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints.

Reads config.json and model.safetensors (or sharded files listed by model.safetensors.index.json).
Experts may be stored per expert (`experts.{e}.w1/w2/w3`, `experts.{e}.gate_proj/up_proj/down_proj`)
or fused (`experts.gate_up_proj` [E, 2F, D] with gate rows first, `experts.down_proj` [E, D, F]).
The whole checkpoint is checked against the config before any tensor is read: a missing,
unexpected or mis-shaped tensor is an error naming it with the expected and found shapes.
Malformed files (JSON, safetensors headers, paths) are refused by `safetensors_files`, and every
block read is checked for NaN/inf unless `allow_nonfinite=True`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moejax.checkpoint.safetensors_files import (
    DTYPES,
    CheckpointError,
    TensorEntry,
    all_finite,
    open_tensor,
    read_json,
    read_rows,
    tensor_files,
)
from moejax.config import ModelConfig

__all__ = ["CheckpointError", "HFSource"]


class _Form(NamedTuple):
    """How a checkpoint stores a canonical tensor: its shape from the canonical one, the conversion of a range
    of stored rows (first axis) to canonical, and which canonical axis those rows run along."""

    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_canonical: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (stored rows, their canonical shape)
    row_axis: int | None  # canonical axis along the stored rows (None: read whole, a single stored row)
    row_unit: Callable[[tuple[int, ...]], int] = lambda c: 1  # stored rows per step along row_axis


# Every conversion is a view (reshape / transpose) of the stored rows read.
_SAME = _Form(lambda c: c, lambda a, c: a, 0)
_T = _Form(lambda c: c[::-1], lambda a, c: a.T, 1)  # torch Linear [out, in] -> [in, out]
_HEADS_IN = _Form(lambda c: (c[1] * c[2], c[0]), lambda a, c: a.reshape(c[1], c[2], c[0]).transpose(2, 0, 1), 1,
                  lambda c: c[2])
_HEADS_OUT = _Form(lambda c: (c[2], c[0] * c[1]), lambda a, c: a.T.reshape(c), 2)
_FLAT = _Form(lambda c: (int(np.prod(c)),), lambda a, c: a.reshape(c), 0, lambda c: int(np.prod(c[1:])))
_ROW = _Form(lambda c: (1, *c), lambda a, c: a[0], None)
READ_BYTES = 2 << 20  # stored rows are read in pieces of about this size: the temporary buffer of a read

# THE mapping of the runtime families: canonical name (see `moejax.weights.canonical_shapes`, derived
# from the model's declarations) -> (Hugging Face name, stored form). Per-layer names are under
# `model.layers.{layer}.`; "{moe}" is the MoE block's prefix ("mlp", or "block_sparse_moe" in
# Mixtral exports). Which tensors a model has (biases, q/k norms, shared expert) follows from the
# declarations for its config; adding a weight is its declaration plus one line here. Public: the demo
# checkpoint writer (moejax.demo) inverts the same tables.
GLOBAL_NAMES = {
    "embed": ("model.embed_tokens.weight", _SAME),
    "unembed": ("lm_head.weight", _T),
    "final_norm": ("model.norm.weight", _SAME),
}
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", _SAME),
    "mlp_norm": ("post_attention_layernorm.weight", _SAME),
    "attn.wq": ("self_attn.q_proj.weight", _HEADS_IN),
    "attn.wk": ("self_attn.k_proj.weight", _HEADS_IN),
    "attn.wv": ("self_attn.v_proj.weight", _HEADS_IN),
    "attn.wo": ("self_attn.o_proj.weight", _HEADS_OUT),
    "attn.bq": ("self_attn.q_proj.bias", _FLAT),
    "attn.bk": ("self_attn.k_proj.bias", _FLAT),
    "attn.bv": ("self_attn.v_proj.bias", _FLAT),
    "attn.bo": ("self_attn.o_proj.bias", _SAME),
    "attn.q_norm": ("self_attn.q_norm.weight", _SAME),
    "attn.k_norm": ("self_attn.k_norm.weight", _SAME),
    "moe.router": ("{moe}.gate.weight", _T),
    "moe.shared_wg": ("mlp.shared_expert.gate_proj.weight", _T),
    "moe.shared_wu": ("mlp.shared_expert.up_proj.weight", _T),
    "moe.shared_wd": ("mlp.shared_expert.down_proj.weight", _T),
    "moe.shared_gate": ("mlp.shared_expert_gate.weight", _ROW),
}
# Routed experts, canonical [E, D, F] / [E, F, D]: per expert `{moe}.experts.{e}.<name>` ([F, D] / [D, F],
# transposed), or fused `{moe}.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `.down_proj` [E, D, F].
EXPERT_NAMES = {"mlp": {"moe.wg": "gate_proj", "moe.wu": "up_proj", "moe.wd": "down_proj"},
                 "block_sparse_moe": {"moe.wg": "w1", "moe.wu": "w3", "moe.wd": "w2"}}


class HFSource:
    """Serves canonical moejax tensors (see `moejax.weights.canonical_shapes`) from a HF checkpoint."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None, allow_nonfinite: bool = False):
        from moejax.weights import canonical_shapes

        self.path = Path(path)
        if not os.path.lexists(self.path / "config.json"):
            raise FileNotFoundError(f"{self.path} is not a Hugging Face checkpoint: no config.json")
        self.cfg = cfg or _load_config(self.path / "config.json")
        self.allow_nonfinite = allow_nonfinite
        self.files = _tensor_files(self.path)
        self.shapes = {name: info[1] for name, info in self.files.items()}
        self.canonical = canonical_shapes(self.cfg)
        self.moe_prefix = self._moe_prefix()
        self.fused = f"model.layers.0.{self.moe_prefix}.experts.gate_up_proj" in self.shapes
        self._check()

    # ---- names and validation ----------------------------------------------------------------

    def hf_name(self, name: str, layer: int | None) -> str:
        """The checkpoint tensor holding canonical tensor `name` (not the routed experts)."""
        if layer is None:
            return GLOBAL_NAMES[name][0]
        return f"model.layers.{layer}." + LAYER_NAMES[name][0].format(moe=self.moe_prefix)

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor name -> shape this config requires (derived from the declarations)."""
        out = {}
        for name, (shape, per_layer) in self.canonical.items():
            if name in ("moe.wg", "moe.wu", "moe.wd"):
                continue
            form = (LAYER_NAMES if per_layer else GLOBAL_NAMES)[name][1]
            for layer in range(self.cfg.num_layers) if per_layer else [None]:
                out[self.hf_name(name, layer)] = tuple(form.hf_shape(shape))
        E, D, F = self.canonical["moe.wg"][0]
        for layer in range(self.cfg.num_layers):
            m = f"model.layers.{layer}.{self.moe_prefix}.experts"
            if self.fused:
                out |= {f"{m}.gate_up_proj": (E, 2 * F, D), f"{m}.down_proj": (E, D, F)}
            else:
                for e in range(E):
                    out |= {self._expert_name(name, layer, e): shape for name, shape in
                            (("moe.wg", (F, D)), ("moe.wu", (F, D)), ("moe.wd", (D, F)))}
        return out

    def _check(self) -> None:
        expected = self.expected()
        found = dict(self.shapes)
        if self.cfg.tie_word_embeddings:
            found.pop("lm_head.weight", None)  # some exporters save the tied head anyway
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = [f"{n}: expected shape {expected[n]}, found {found[n]}" for n in sorted(set(expected) & set(found))
                 if tuple(found[n]) != expected[n]]
        problems = ([f"missing tensor {n} (expected shape {expected[n]})" for n in missing[:20]]
                    + [f"unexpected tensor {n} with shape {found[n]}" for n in unexpected[:20]] + wrong)
        if problems:
            more = max(0, len(missing) - 20) + max(0, len(unexpected) - 20)
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({self.cfg.family}): "
                                  + "; ".join(problems) + (f"; and {more} more" if more else ""))

    def _moe_prefix(self) -> str:
        if self.cfg.family == "mixtral" and "model.layers.0.block_sparse_moe.gate.weight" in self.shapes:
            return "block_sparse_moe"
        return "mlp"

    def _expert_name(self, name: str, layer: int, e: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{e}.{EXPERT_NAMES[self.moe_prefix][name]}.weight"

    # ---- reading -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """A memory-mapped view of one stored tensor, for inspection (loading reads with `read_into`)."""
        return open_tensor(name, self.files[name])

    def read(self, name: str, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        shape = self.canonical[name][0]
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)],
                       DTYPES[self._stored(name, layer, 0)[1].dtype])
        return self.read_into(name, layer, index, out)

    def read_into(self, name: str, layer: int | None, index: tuple[slice, ...], out: np.ndarray) -> np.ndarray:
        """Fill `out` with canonical tensor `name` (of `layer`) sliced by `index` (cast to `out`'s dtype);
        the stored rows it covers are read in pieces of about `READ_BYTES`, nothing else is allocated."""
        canonical = self.canonical[name][0]
        if name not in ("moe.wg", "moe.wu", "moe.wd"):
            hf, entry = self._stored(name, layer, 0)
            form = (GLOBAL_NAMES if layer is None else LAYER_NAMES)[name][1]
            self._read_form(f"{hf} ({name})", entry, form, canonical, index, out)
            return out
        for i, e in enumerate(range(*index[0].indices(canonical[0]))):  # [E, D, F] or [E, F, D]: one expert at a time
            what, entry = self._stored(name, layer, e)
            self._read_form(what, entry, _T, canonical[1:], index[1:], out[i])
        return out

    def _stored(self, name: str, layer: int | None, expert: int) -> tuple[str, TensorEntry]:
        """(what to call it in errors, where its bytes are) for canonical `name`, or one expert's matrix of a
        routed-expert tensor (stored [F, D] for gate/up and [D, F] for down: canonical transposed)."""
        if name not in ("moe.wg", "moe.wu", "moe.wd"):
            hf = self.hf_name(name, layer)
            return hf, self.files[hf]
        if not self.fused:
            hf = self._expert_name(name, layer, expert)
            return hf, self.files[hf]
        hf = f"model.layers.{layer}.{self.moe_prefix}.experts.{'down_proj' if name == 'moe.wd' else 'gate_up_proj'}"
        entry = self.files[hf]
        _, rows, cols = entry.shape  # [E, D, F], or [E, 2F, D] with gate rows first
        kept = {"moe.wd": (0, rows), "moe.wg": (0, rows // 2), "moe.wu": (rows // 2, rows)}[name]
        itemsize = np.dtype(DTYPES[entry.dtype]).itemsize
        offset = entry.offset + (expert * rows + kept[0]) * cols * itemsize
        return f"{hf} (expert {expert})", entry._replace(shape=(kept[1] - kept[0], cols), offset=offset)

    def _read_form(self, what: str, entry: TensorEntry, form: _Form, canonical: tuple[int, ...],
                   index: tuple[slice, ...], out: np.ndarray) -> None:
        """`out` = the canonical tensor stored in `entry` as `form`, sliced by `index`, read in pieces of rows."""
        bounds = [s.indices(n)[:2] for s, n in zip(index, canonical, strict=True)]
        if form.row_axis is None:  # one stored row: read it whole
            out[...] = self._checked(form.to_canonical(read_rows(what, entry, 0, entry.shape[0]), canonical)
                                     [tuple(slice(*b) for b in bounds)], what)
            return
        axis, unit = form.row_axis, form.row_unit(canonical)
        row_bytes = int(np.prod(entry.shape[1:])) * np.dtype(DTYPES[entry.dtype]).itemsize * unit
        step = max(1, READ_BYTES // max(1, row_bytes))
        start, stop = bounds[axis]
        for a in range(start, stop, step):
            b = min(a + step, stop)
            rows = read_rows(what, entry, a * unit, b * unit)
            piece = form.to_canonical(rows, (*canonical[:axis], b - a, *canonical[axis + 1:]))
            src = [slice(*bound) for bound in bounds]
            src[axis] = slice(None)
            dst = [slice(None)] * len(bounds)
            dst[axis] = slice(a - start, b - start)
            out[tuple(dst)] = self._checked(piece[tuple(src)], what)
            del rows, piece  # before the next piece is read

    def _checked(self, block: np.ndarray, what: str) -> np.ndarray:
        """`block` unchanged, or an error naming the tensor if it holds NaN/inf (unless allowed)."""
        if self.allow_nonfinite or all_finite(block):
            return block
        finite = np.isfinite(block)
        if not finite.all():
            bad = finite.size - int(np.count_nonzero(finite))
            raise CheckpointError(f"checkpoint {self.path}: tensor {what} has {bad} non-finite value(s) (NaN or inf) "
                                  f"in the block read; pass allow_nonfinite=True to load it anyway")
        return block


def _tensor_files(path: Path) -> dict[str, TensorEntry]:
    """name -> (file, shape, dtype, byte offset) over the checkpoint's safetensors files (headers only)."""
    return tensor_files(path)


def _load_config(file: Path) -> ModelConfig:
    """The ModelConfig of a config.json; a malformed file is a CheckpointError naming it."""
    data = read_json(file, "config")
    try:
        return ModelConfig.from_hf(data, name=file.parent.name)
    except KeyError as e:
        raise CheckpointError(f"config {file} has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"config {file}: {e}") from None
