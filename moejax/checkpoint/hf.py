"""Hugging Face safetensors import for every runtime family (Mixtral, Qwen2/3-MoE, DeepSeek-V3, GLM-4.5, OLMoE,
gpt-oss).

Reads config.json and model.safetensors (or sharded files listed by model.safetensors.index.json). Where each
canonical tensor is stored, and in which layout, is the family's table (`moejax.checkpoint.families`); this
module is the generic reader: it checks the whole checkpoint against the config before any tensor is read (a
missing, unexpected or mis-shaped tensor is an error naming it with the expected and found shapes), then reads
each requested slice in pieces of stored rows. Multi-token-prediction layers stored after the last layer
(DeepSeek-V3, GLM-4.5) are skipped with a warning. Malformed files (JSON, safetensors headers, paths) are
refused by `safetensors_files`, and every block read is checked for NaN/inf unless `allow_nonfinite=True`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moejax.checkpoint import families
from moejax.checkpoint.families.forms import Experts, Form, Stored, stored_shape, to_hf
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

__all__ = ["CheckpointError", "HFSource", "hf_tensors"]

READ_BYTES = 2 << 20  # stored rows are read in pieces of about this size: the temporary buffer of a read
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class HFSource:
    """Serves canonical moejax tensors (see `moejax.weights.canonical_shapes`) from a HF checkpoint."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None, allow_nonfinite: bool = False):
        from moejax.weights import canonical_shapes

        self.path = Path(path)
        if not os.path.lexists(self.path / "config.json"):
            raise FileNotFoundError(f"{self.path} is not a Hugging Face checkpoint: no config.json")
        hf_config = read_json(self.path / "config.json", "config")
        self.cfg = cfg or _config(self.path / "config.json", hf_config)
        self.allow_nonfinite = allow_nonfinite
        self.files = _tensor_files(self.path)
        self.shapes = {name: info[1] for name, info in self.files.items()}
        self.canonical = canonical_shapes(self.cfg)
        self.names = families.names_for(self.cfg, self.files)
        unknown = sorted(set(self.canonical) - set(self.names))
        if unknown:
            raise CheckpointError(f"checkpoint {self.path}: the {self.cfg.family} checkpoint table has no entry for "
                                  f"the model's tensor(s) {unknown}")
        self.mtp_layers = families.mtp_layers(self.cfg, hf_config)
        self._check()

    # ---- names and validation ----------------------------------------------------------------

    def hf_name(self, name: str, layer: int | None, expert: int | None = None) -> str:
        """The checkpoint tensor holding canonical tensor `name` of `layer` (for one tensor per expert: of `expert`)."""
        return self.names[name].name.format(layer=layer, expert=expert)

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor name -> shape this config requires (derived from the declarations)."""
        out = {}
        for name, (shape, layers) in self.canonical.items():
            stored = self.names[name]
            per_expert = "{expert}" in stored.name
            for layer in layers or [None]:
                for expert in range(shape[0]) if per_expert else [None]:
                    out[self.hf_name(name, layer, expert)] = stored_shape(stored, shape)
        return out

    def _check(self) -> None:
        expected = self.expected()
        found = dict(self.shapes)
        if self.cfg.tie_word_embeddings:
            found.pop("lm_head.weight", None)  # some exporters save the tied head anyway
        mtp = [n for n in found if (m := _LAYER.match(n)) and
               self.cfg.num_layers <= int(m[1]) < self.cfg.num_layers + self.mtp_layers]
        for n in mtp:
            del found[n]
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
        if mtp:
            first, last = self.cfg.num_layers, self.cfg.num_layers + self.mtp_layers - 1
            warnings.warn(f"checkpoint {self.path}: skipped {len(mtp)} tensors of the multi-token-prediction "
                          f"layer(s) (model.layers.{first}" + (f"-{last}" if last > first else "")
                          + "; kept in the checkpoint for speculative decoding, not loaded)", stacklevel=3)

    # ---- reading -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """A memory-mapped view of one stored tensor, for inspection (loading reads with `read_into`)."""
        return open_tensor(name, self.files[name])

    def read(self, name: str, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        shape = self.canonical[name][0]
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)],
                       DTYPES[self._entry(name, layer, 0)[1].dtype])
        return self.read_into(name, layer, index, out)

    def read_into(self, name: str, layer: int | None, index: tuple[slice, ...], out: np.ndarray) -> np.ndarray:
        """Fill `out` with canonical tensor `name` (of `layer`) sliced by `index` (cast to `out`'s dtype);
        the stored rows it covers are read in pieces of about `READ_BYTES`, nothing else is allocated."""
        canonical, form = self.canonical[name][0], self.names[name].form
        if isinstance(form, Form):
            what, entry = self._entry(name, layer, 0)
            self._read_form(what, entry, form, canonical, index, out)
            return out
        for i, e in enumerate(range(*index[0].indices(canonical[0]))):  # [E, ...]: one expert at a time
            what, entry = self._entry(name, layer, e)
            self._read_form(what, entry, form.form, canonical[1:], index[1:], out[i])
        return out

    def _entry(self, name: str, layer: int | None, expert: int) -> tuple[str, TensorEntry]:
        """(what to call it in errors, where its bytes are) for canonical `name`, or for one expert's matrix of a
        routed-expert tensor (`Experts`): its own tensor, or its block of the fused one."""
        stored = self.names[name]
        if not isinstance(stored.form, Experts):
            hf = self.hf_name(name, layer)
            return f"{hf} ({name})", self.files[hf]
        if "{expert}" in stored.name:
            hf = self.hf_name(name, layer, expert)
            return hf, self.files[hf]
        hf = self.hf_name(name, layer)
        entry = self.files[hf]
        rows, cols = entry.shape[1], int(np.prod(entry.shape[2:]))  # [E, rows, ...]: this tensor's part of the rows
        part, parts = stored.form.part
        kept = rows // parts
        offset = entry.offset + (expert * rows + part * kept) * cols * np.dtype(DTYPES[entry.dtype]).itemsize
        return f"{hf} (expert {expert}, {name})", entry._replace(shape=(kept, *entry.shape[2:]), offset=offset)

    def _read_form(self, what: str, entry: TensorEntry, form: Form, canonical: tuple[int, ...],
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


def hf_tensors(cfg: ModelConfig, read: Callable[[str, int | None], np.ndarray],
               names: dict[str, Stored] | None = None) -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> array holding the canonical tensors `read(name, layer)` (whole), in the family's
    names and layouts (`names`: a table of `families.names_for`, by default the family's default export): the
    reader's views inverted, so that a writer and the reader cannot disagree on a name or a layout."""
    from moejax.weights import canonical_shapes

    names = names or families.names_for(cfg)
    out: dict[str, np.ndarray] = {}
    for name, (shape, layers) in canonical_shapes(cfg).items():
        stored = names[name]
        for layer in layers or [None]:
            value = read(name, layer)
            if isinstance(stored.form, Form):
                hf = stored.name.format(layer=layer)
                target = out.setdefault(hf, np.zeros(stored_shape(stored, shape), value.dtype))
                to_hf(stored.form, value, target)
                continue
            for e in range(shape[0]):
                if "{expert}" in stored.name:
                    hf = stored.name.format(layer=layer, expert=e)
                    target = out.setdefault(hf, np.zeros(stored_shape(stored, shape), value.dtype))
                else:
                    fused = out.setdefault(stored.name.format(layer=layer),
                                           np.zeros(stored_shape(stored, shape), value.dtype))
                    part, parts = stored.form.part
                    kept = fused.shape[1] // parts
                    target = fused[e, part * kept:(part + 1) * kept]
                to_hf(stored.form.form, value[e], target)
    return out


def _tensor_files(path: Path) -> dict[str, TensorEntry]:
    """name -> (file, shape, dtype, byte offset) over the checkpoint's safetensors files (headers only)."""
    return tensor_files(path)


def _config(file: Path, data: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of config.json `data`; a config that cannot be read (a missing entry, an unsupported feature
    such as quantization_config) is a CheckpointError naming the file."""
    try:
        return ModelConfig.from_hf(data, name=file.parent.name)
    except KeyError as e:
        raise CheckpointError(f"config {file} has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"config {file}: {e}") from None
