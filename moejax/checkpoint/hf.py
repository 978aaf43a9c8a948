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

from moejax.checkpoint import families, quantized
from moejax.checkpoint.families.forms import Experts, Form, Stored, stored_shape, to_hf
from moejax.checkpoint.safetensors_files import (
    DTYPES,
    STORED_DTYPES,
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
        self.format = quantized.format_of(hf_config, str(self.path / "config.json"))
        self.quantized = self._quantized_names()
        self._check()

    @property
    def quantization(self):
        """The checkpoint's own quantization (`moejax.quant.Scheme`, stored=True) covering the canonical tensors it
        stores quantized, or None for a float checkpoint."""
        from moejax.quant import Scheme

        if self.format is None or not self.quantized:
            return None
        fmt = self.format
        return Scheme(fmt.precision, fmt.qtype, fmt.block[1] if fmt.block else None, stored=True,
                      names=frozenset(self.quantized), fmt=fmt.describe())

    def _quantized_names(self) -> set[str]:
        """Canonical tensors stored quantized: those whose (first) stored tensor has a scale tensor beside it."""
        if self.format is None:
            return set()
        out = set()
        for name, (_, layers) in self.canonical.items():
            hf = self.hf_name(name, layers[0] if layers else None, 0)
            if self.format.scale_name(hf) in self.files and self.format.scale_name(hf) != hf:
                out.add(name)
        return out

    # ---- names and validation ----------------------------------------------------------------

    def hf_name(self, name: str, layer: int | None, expert: int | None = None) -> str:
        """The checkpoint tensor holding canonical tensor `name` of `layer` (for one tensor per expert: of `expert`)."""
        return self.names[name].name.format(layer=layer, expert=expert)

    def expected(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Hugging Face tensor name -> the shape(s) this config allows (derived from the declarations); a quantized
        tensor's values and its scales each have an entry."""
        out = {}
        for name, (shape, layers) in self.canonical.items():
            stored = self.names[name]
            per_expert = "{expert}" in stored.name
            matrix = stored_shape(stored, shape)
            for layer in layers or [None]:
                for expert in range(shape[0]) if per_expert else [None]:
                    hf = self.hf_name(name, layer, expert)
                    if name in self.quantized:
                        out[hf] = (self.format.values_shape(matrix),)
                        out[self.format.scale_name(hf)] = tuple(self.format.scale_shapes(matrix))
                    else:
                        out[hf] = (matrix,)
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

        def shapes(n):
            return " or ".join(str(s) for s in expected[n])

        wrong = [f"{n}: expected shape {shapes(n)}, found {found[n]}" for n in sorted(set(expected) & set(found))
                 if tuple(found[n]) not in expected[n]]
        problems = ([f"missing tensor {n} (expected shape {shapes(n)})" for n in missing[:20]]
                    + [f"unexpected tensor {n} with shape {found[n]}" for n in unexpected[:20]] + wrong
                    + self._dtype_problems(set(expected) & set(found)))
        if problems:
            more = max(0, len(missing) - 20) + max(0, len(unexpected) - 20)
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({self.cfg.family}): "
                                  + "; ".join(problems) + (f"; and {more} more" if more else ""))
        if mtp:
            first, last = self.cfg.num_layers, self.cfg.num_layers + self.mtp_layers - 1
            warnings.warn(f"checkpoint {self.path}: skipped {len(mtp)} tensors of the multi-token-prediction "
                          f"layer(s) (model.layers.{first}" + (f"-{last}" if last > first else "")
                          + "; kept in the checkpoint for speculative decoding, not loaded)", stacklevel=3)

    def _dtype_problems(self, names: set[str]) -> list[str]:
        """Float tensors must be float, a quantized tensor's values the format's type: an FP8 tensor without its
        scales (an export that dropped them) would load silently wrong."""
        fmt, problems = self.format, []
        values = {self.hf_name(n, layer, e) for n in self.quantized
                  for layer in (self.canonical[n][1] or [None])
                  for e in (range(self.canonical[n][0][0]) if "{expert}" in self.names[n].name else [None])}
        scales = {fmt.scale_name(v) for v in values} if fmt else set()
        for n in sorted(names):
            dtype = self.files[n].dtype
            if n in values and dtype != fmt.values_dtype:
                problems.append(f"{n}: {fmt.describe()} values must be {fmt.values_dtype}, found {dtype}")
            elif n in scales and dtype not in (*DTYPES, "U8" if fmt.method == "mxfp4" else "F32", "F8_E8M0"):
                problems.append(f"{n}: scales must be float (F32/BF16/F16) or E8M0, found {dtype}")
            elif n not in values and n not in scales and dtype not in DTYPES:
                why = ("the config declares no quantization_config" if fmt is None else
                       f"it has no scale tensor {fmt.scale_name(n)}")
                problems.append(f"{n} has dtype {dtype}, which is not a floating type, and {why}: a quantized "
                                f"tensor needs its scales")
        return problems[:20]

    # ---- reading -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """A memory-mapped view of one stored tensor, for inspection (loading reads with `read_into`)."""
        return open_tensor(name, self.files[name])

    def read(self, name: str, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        shape = self.canonical[name][0]
        dtype = np.float32 if name in self.quantized else DTYPES[self._entry(name, layer, 0)[1].dtype]
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)], dtype)
        return self.read_into(name, layer, index, out)

    def read_into(self, name: str, layer: int | None, index: tuple[slice, ...], out: np.ndarray) -> np.ndarray:
        """Fill `out` with canonical tensor `name` (of `layer`) sliced by `index` (cast to `out`'s dtype; a quantized
        tensor dequantized); the stored rows it covers are read in pieces of about `READ_BYTES`, nothing else is
        allocated."""
        return self._read(name, layer, index, out, "dequantized" if name in self.quantized else "float")

    def read_quantized_into(self, name: str, part: str, layer: int | None, index: tuple[slice, ...],
                            out: np.ndarray) -> np.ndarray:
        """A quantized canonical tensor as stored: `part` "values" (the storage type) or "scale" (each element's
        scale, float32, same shape as the values), sliced by `index` in canonical coordinates."""
        if name not in self.quantized:
            raise KeyError(f"{name} is not stored quantized in {self.path}")
        return self._read(name, layer, index, out, part)

    def _read(self, name, layer, index, out, kind: str) -> np.ndarray:
        canonical, form = self.canonical[name][0], self.names[name].form
        if isinstance(form, Form):
            self._read_form(name, layer, None, form, canonical, index, out, kind)
            return out
        for i, e in enumerate(range(*index[0].indices(canonical[0]))):  # [E, ...]: one expert at a time
            self._read_form(name, layer, e, form.form, canonical[1:], index[1:], out[i], kind)
        return out

    def _entry(self, name: str, layer: int | None, expert: int, scale: bool = False) -> tuple[str, TensorEntry]:
        """(what to call it in errors, where its bytes are) for canonical `name`, or for one expert's matrix of a
        routed-expert tensor (`Experts`): its own tensor, or its block of the fused one. `scale`: the quantized
        tensor's scale tensor instead of its values."""
        stored = self.names[name]
        tensor = self.format.scale_name if scale else (lambda hf: hf)
        if not isinstance(stored.form, Experts):
            hf = tensor(self.hf_name(name, layer))
            return f"{hf} ({name})", self.files[hf]
        if "{expert}" in stored.name:
            hf = tensor(self.hf_name(name, layer, expert))
            return hf, self.files[hf]
        hf = tensor(self.hf_name(name, layer))
        entry = self.files[hf]
        rows, cols = entry.shape[1], int(np.prod(entry.shape[2:]))  # [E, rows, ...]: this tensor's part of the rows
        part, parts = stored.form.part
        kept = rows // parts
        offset = entry.offset + (expert * rows + part * kept) * cols * np.dtype(STORED_DTYPES[entry.dtype]).itemsize
        return f"{hf} (expert {expert}, {name})", entry._replace(shape=(kept, *entry.shape[2:]), offset=offset)

    def _read_form(self, name: str, layer: int | None, expert: int | None, form: Form, canonical: tuple[int, ...],
                   index: tuple[slice, ...], out: np.ndarray, kind: str) -> None:
        """`out` = the canonical tensor stored as `form`, sliced by `index`, read in pieces of stored rows. `kind`:
        "float" (a float tensor), or a quantized one's "values", "scale" (per element) or "dequantized"."""
        what, entry = self._entry(name, layer, expert or 0)
        rows = self._rows_reader(name, layer, expert or 0, what, entry, kind)
        bounds = [s.indices(n)[:2] for s, n in zip(index, canonical, strict=True)]
        if form.row_axis is None:  # one stored row: read it whole
            out[...] = self._checked(form.to_canonical(rows(0, entry.shape[0]), canonical)
                                     [tuple(slice(*b) for b in bounds)], what)
            return
        axis, unit = form.row_axis, form.row_unit(canonical)
        row_bytes = int(np.prod(entry.shape[1:])) * np.dtype(STORED_DTYPES[entry.dtype]).itemsize * unit
        if kind != "float":  # quantized: the pieces are float32 elements (fp4 packs two per stored byte)
            row_bytes = max(row_bytes, self.format.matrix(entry.shape)[1] * 4 * unit)
        step = max(1, READ_BYTES // max(1, row_bytes))
        start, stop = bounds[axis]
        for a in range(start, stop, step):
            b = min(a + step, stop)
            piece = form.to_canonical(rows(a * unit, b * unit), (*canonical[:axis], b - a, *canonical[axis + 1:]))
            src = [slice(*bound) for bound in bounds]
            src[axis] = slice(None)
            dst = [slice(None)] * len(bounds)
            dst[axis] = slice(a - start, b - start)
            out[tuple(dst)] = self._checked(piece[tuple(src)], what) if kind != "scale" else piece[tuple(src)]
            del piece  # before the next piece is read

    def _rows_reader(self, name, layer, expert, what, entry, kind):
        """(start, stop) -> stored matrix rows [start, stop) as elements of `kind` (see `_read_form`)."""
        if kind == "float":
            return lambda a, b: read_rows(what, entry, a, b)
        fmt = self.format
        matrix = fmt.matrix(entry.shape)
        s_what, s_entry = self._entry(name, layer, expert, scale=True)
        bo, bi = fmt.block_of(matrix, s_entry.shape)

        def scale_rows(a: int, b: int) -> np.ndarray:
            if bo >= matrix[0] or not s_entry.shape:  # one scale row (per tensor): read whole
                s = fmt.scales(np.asarray(open_tensor(s_what, s_entry)).reshape(1, -1))
                quantized.check_scales(s, s_what)
                s = np.broadcast_to(s, (b - a, s.shape[1]))
            else:
                lo, hi = a // bo, -(-b // bo)
                s = fmt.scales(read_rows(s_what, s_entry, lo, hi).reshape(hi - lo, -1))
                quantized.check_scales(s, s_what)
                s = np.repeat(s, bo, axis=0)[a - lo * bo: b - lo * bo]
            if s.shape[1] == 1:
                return np.broadcast_to(s, (b - a, matrix[1]))
            return np.repeat(s, bi, axis=1)[:, :matrix[1]]

        def rows(a: int, b: int) -> np.ndarray:
            if kind == "scale":
                return scale_rows(a, b)
            values = fmt.values(read_rows(what, entry, a, b))
            return values if kind == "values" else values.astype(np.float32) * scale_rows(a, b)

        return rows

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
