"""moejax checkpoints: a model's canonical tensors in one orbax checkpoint, restored into any layout.

`save` (behind `moejax convert`) writes a plain orbax PyTree checkpoint (OCDBT + zarr3) of numpy
arrays, one per canonical tensor (`moejax.weights.canonical_shapes`): global tensors as they are,
per-layer tensors stacked over the layers that carry them ([L, ...]; dense-FFN tensors over the dense
layers only, MoE tensors over the MoE layers). Its custom metadata (key "moejax") holds the format version, the
`ModelConfig`, the stored dtype and the source checkpoint. `open_source` tells a Hugging Face
directory from a moejax checkpoint and returns a weight source for either; `moejax.load` goes
through it, so both kinds are placed by the same `weights.place` into any layout.

Invariants:
- Layout-independent: nothing stored depends on a mesh. Stage padding, vocabulary / FFN padding and
  repeated kv heads are applied by `weights.place`, which builds each parameter shard by shard (for
  this process's devices only); `OrbaxSource.read_into` reads the requested slice of one layer through
  tensorstore, which fetches only the chunks covering it, in pieces of whole chunks (bounded memory).
- Chunks are at most `CHUNK_BYTES`, and a per-layer tensor's chunks hold one layer each, so a
  device's read touches about its own shard's bytes, never a whole tensor.
- Every chunk carries a crc32c checksum (a zarr3 codec; the shard index has one too), so a flipped,
  zeroed or truncated byte is a `CheckpointError` naming the tensor, never silently wrong weights.
  Missing chunks are errors too (`fill_missing_data_reads` is off).
- Written tensor by tensor and layer by layer (`_StreamingHandler`): converting holds about one layer
  of one tensor in memory. Everything (orbax's part, then the tokenizer files) is written into a
  staging directory beside the target and renamed onto it when complete, so an interrupted conversion
  never leaves a checkpoint that looks whole; `save` removes its staging directory when interrupted,
  and removes one left by a killed conversion before it starts.
- The metadata is bound to the data: `save` draws a checkpoint id, and stores the fingerprint of (id,
  config, dtype, tensor names and shapes) as a tensor of its own (`FINGERPRINT`, chunk-checksummed like
  the others). `OrbaxSource` recomputes it from the metadata and refuses a checkpoint whose metadata was
  not written with its tensors (copied from another checkpoint of the same shapes, or edited).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from moejax.checkpoint.hf import HFSource
from moejax.checkpoint.safetensors_files import CheckpointError, all_finite, read_json
from moejax.config import ModelConfig
from moejax.weights import StoredPart, canonical_shapes, quantized_shapes

FORMAT = "moejax.canonical"
FORMAT_VERSION = 2  # 2: the fingerprint tensor
FINGERPRINT = "moejax.fingerprint"  # the stored tensor (uint8[32]) binding the metadata to the data
CHUNK_BYTES = 1 << 20  # largest stored chunk: the unit a partial read decodes
BLOCK_BYTES = 64 << 20  # largest block of a global tensor held in memory while converting
READ_BYTES = 2 << 20  # a slice is read in pieces of about this size (see OrbaxSource.read_into)
OCDBT_CACHE_BYTES = 16 << 20  # B-tree nodes kept while reading (orbax's own default is 100 MB)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
QUANTIZED_STORAGE = ("F8_E4M3", "I8", "U8", "F8_E8M0")  # a quantized checkpoint's values (and E8M0 scales)
_SCALE_SUFFIXES = ("_scale_inv", "_scale", "_scales")
SCALE = ".scale"  # a quantized tensor's scales: the tensor `name + SCALE`, one per tile (`weights.quantized_shapes`)
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_TMP_SUFFIXES = (".moejax-tmp", ".orbax-checkpoint-tmp")  # save's staging directory; orbax's own (older writes)

Index = tuple[slice, ...]


# ---- kinds of checkpoint ----------------------------------------------------------------------------


def is_moejax_checkpoint(path: str | Path) -> bool:
    """True if `path` is a directory holding an orbax checkpoint rather than a Hugging Face one."""
    path = Path(path)
    if not path.is_dir() or os.path.lexists(path / "config.json"):
        return False
    return any(os.path.lexists(path / marker) for marker in _ORBAX_MARKERS)


def open_source(path: str | Path, allow_nonfinite: bool = False):
    """A weight source for a checkpoint directory of either kind: `HFSource` or `OrbaxSource`.

    A directory with config.json is read as Hugging Face safetensors, one with orbax's files as a moejax
    checkpoint. Either refuses NaN/inf weights as it reads them unless `allow_nonfinite`.
    """
    path = Path(path)
    _refuse_interrupted(path)
    if is_moejax_checkpoint(path):
        return OrbaxSource(path, allow_nonfinite=allow_nonfinite)
    return HFSource(path, allow_nonfinite=allow_nonfinite)


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a moejax checkpoint, its `dtype` the stored one (its metadata only; no tensor is
    opened)."""
    return _config(Path(path), _orbax_metadata(Path(path))[1])


def source_dtype(source) -> str:
    """The one floating dtype every float tensor of a Hugging Face checkpoint is stored in (for convert's default;
    a quantized checkpoint's values and scales are kept as they are)."""
    found = sorted({entry.dtype for entry in source.files.values()} - set(QUANTIZED_STORAGE))
    if getattr(source, "quantization", None) is not None:  # its float tensors; scales may be F32 beside BF16 ones
        found = sorted({e.dtype for n, e in source.files.items() if not n.endswith(_SCALE_SUFFIXES)}
                       - set(QUANTIZED_STORAGE))
    if len(found) == 1 and found[0] in _SAFETENSORS_DTYPES:
        return _SAFETENSORS_DTYPES[found[0]]
    raise CheckpointError(f"checkpoint {source.path} stores tensors as {', '.join(found)}; choose the stored dtype "
                          f"with --dtype ({', '.join(DTYPES)})")


def _refuse_interrupted(path: Path) -> None:
    if path.exists():
        return
    partial = _partial_writes(path)
    if partial:
        raise CheckpointError(f"checkpoint {path} is incomplete: its conversion did not finish ({partial[0].name} "
                              f"is a partial write); remove it and run moejax convert again")


# ---- writing ----------------------------------------------------------------------------------------


def save(path: str | Path, source, cfg: ModelConfig, dtype: str = "float32", origin: dict[str, Any] | None = None,
         progress: Callable[[int], None] | None = None, chunk_bytes: int = CHUNK_BYTES,
         files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Write every canonical tensor of `cfg`, read from `source`, as a moejax checkpoint at `path`.

    Args:
      path: the checkpoint directory to create; it must not exist.
      source: any weight source (`read(name, layer, index)` of canonical tensors).
      cfg: the model config the tensors belong to (stored in the metadata).
      dtype: stored dtype, one of `DTYPES`; values are rounded to it once, here.
      origin: where the tensors came from (stored as metadata "source").
      progress: called with the number of bytes after each block is written.
      chunk_bytes: largest stored chunk (tests use small ones).
      files: files copied into the checkpoint directory as they are (tokenizer and generation config).

    Returns:
      The metadata written (under the orbax custom metadata key "moejax").
    """
    path = Path(path).absolute()
    if os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; a checkpoint is written to a new directory")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    stored = DTYPES[dtype]
    scheme = getattr(source, "quantization", None)
    quantization = _scheme_meta(scheme)
    checkpoint_id = uuid.uuid4().hex
    fingerprint = _fingerprint(cfg, dtype, checkpoint_id, quantization)
    item = {FINGERPRINT: _Tensor(FINGERPRINT, (len(fingerprint),), np.dtype(np.uint8), None, _Bytes(fingerprint))}
    save_args = {FINGERPRINT: ocp.SaveArgs()}
    for name, shape, layers, tensor_dtype, reader in _stored_tensors(cfg, scheme, stored, source):
        full = (len(layers), *shape) if layers is not None else shape
        item[name] = _Tensor(name, full, tensor_dtype, layers, reader)
        save_args[name] = ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if layers is not None else ())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": _config_fields(cfg), "dtype": dtype,
            "checkpoint_id": checkpoint_id, "source": origin or {},
            "written_by": {p: _version(p) for p in ("moejax", "orbax-checkpoint")}}
    if quantization:
        meta["quantization"] = quantization
    streaming = _StreamingHandler(progress)
    registry = ocp.type_handlers.create_type_handler_registry(
        (_Tensor, streaming), (jax.Array, ocp.type_handlers.ArrayHandler()))  # the latter: unused
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=True, type_handler_registry=registry)
    staging = path.with_name(path.name + _TMP_SUFFIXES[0])
    for stale in _partial_writes(path):  # left by a conversion that was killed: it cannot be resumed
        shutil.rmtree(stale)
    with _orbax_errors_raised_not_logged():
        try:
            with ocp.Checkpointer(handler) as checkpointer:
                try:
                    checkpointer.save(staging, args=ocp.args.PyTreeSave(item, save_args=save_args,
                                                                        custom_metadata={"moejax": meta}))
                except BaseException:
                    streaming.stop()  # orbax's writer thread must end before the clean-up, or it writes on
                    raise
            for file in map(Path, files):
                shutil.copy2(file, staging / file.name)
            os.rename(staging, path)
        except BaseException:  # a bad source tensor, a full disk, ^C: leave nothing half-written behind
            for partial in _partial_writes(path):
                shutil.rmtree(partial, ignore_errors=True)
            raise
    return meta


def _partial_writes(path: Path) -> list[Path]:
    """The staging directories of a checkpoint at `path`: save's (orbax's is named after it), and older orbax ones."""
    if not path.parent.is_dir():
        return []
    return sorted(p for suffix in _TMP_SUFFIXES for p in path.parent.glob(f"{path.name}{suffix}*"))


def _fingerprint(cfg: ModelConfig, dtype: str, checkpoint_id: str, quantization: dict | None = None) -> bytes:
    """sha256 of what the metadata says about the data: the checkpoint id, config, dtype, tensor names and shapes
    (and the quantization, for a quantized checkpoint)."""
    every = tuple(range(cfg.num_layers))  # written as `true`, as before tensors had layer sets: same fingerprints
    tensors = {name: [list(shape), layers == every or (list(layers) if layers else False)]
               for name, (shape, layers) in canonical_shapes(cfg).items()}
    fields = {"id": checkpoint_id, "config": _config_fields(cfg), "dtype": dtype, "tensors": tensors}
    if quantization:
        fields["quantization"] = quantization
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()


def _config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config as stored (and fingerprinted): every field but `dtype`, which is the checkpoint's stored dtype
    (metadata "dtype"; `_config` puts it back), as in checkpoints written before the config had it."""
    fields = dataclasses.asdict(cfg)
    del fields["dtype"]
    return fields


def _scheme_meta(scheme) -> dict | None:
    """A stored quantization scheme (`moejax.quant.Scheme`) as metadata, or None."""
    if scheme is None:
        return None
    return {"precision": scheme.name, "qtype": np.dtype(scheme.qtype).name, "block": scheme.block,
            "fmt": scheme.fmt, "names": sorted(scheme.names or ())}


def _scheme_of(meta: dict | None):
    """The stored `moejax.quant.Scheme` of a checkpoint's metadata entry, or None."""
    if not meta:
        return None
    from moejax.quant import Scheme

    return Scheme(meta["precision"], jnp.dtype(meta["qtype"]).type, meta["block"], stored=True,
                  names=frozenset(meta["names"]), fmt=meta["fmt"])


def _stored_tensors(cfg: ModelConfig, scheme, stored: np.dtype, source):
    """(name, shape without the layer axis, layers, dtype, reader) of every tensor a checkpoint stores: each
    canonical tensor in `stored`, or, quantized, its values in their type and its scales (float32, one per tile)."""
    quantized = quantized_shapes(cfg, scheme) if scheme is not None else {}
    for name, (shape, layers) in canonical_shapes(cfg).items():
        if name not in quantized:
            yield name, shape, layers, stored, source
            continue
        values, scale = quantized[name]
        yield name, shape, layers, np.dtype(scheme.qtype), StoredPart(source, "values", scheme.qtype)
        tiles = tuple(v // s for v, s in zip(values, scale, strict=True))
        yield name + SCALE, scale, layers, np.dtype(np.float32), _ScaleTiles(source, name, tiles)


class _ScaleTiles:
    """A quantized tensor's scales, one per tile (`tiles`: elements per tile along each dim), from a source's
    per-element scales."""

    def __init__(self, source, name: str, tiles: tuple[int, ...]):
        self.source, self.name, self.tiles = source, name, tiles

    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        shape = self.source.canonical[self.name][0]
        bounds = [s.indices(n // t)[:2] for s, n, t in zip(index, shape, self.tiles, strict=True)]
        elements = tuple(slice(a * t, b * t) for (a, b), t in zip(bounds, self.tiles, strict=True))
        out = np.empty([(b - a) * t for (a, b), t in zip(bounds, self.tiles, strict=True)], np.float32)
        self.source.read_quantized_into(self.name, "scale", layer, elements, out)
        return out[tuple(slice(None, None, t) for t in self.tiles)]


class _Bytes:
    """A weight source for the fingerprint tensor (read as `_Tensor.blocks` reads every source)."""

    def __init__(self, data: bytes):
        self.array = np.frombuffer(data, np.uint8)

    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        return self.array[index]


@contextlib.contextmanager
def _orbax_errors_raised_not_logged():
    """orbax logs a failed write's traceback from its writer thread, then raises the error here: keep the raise."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def total_bytes(cfg: ModelConfig, dtype: str, scheme=None) -> int:
    """Bytes of every canonical tensor of `cfg` stored as `dtype`, or quantized as stored under `scheme` (what
    `save` writes, before compression)."""
    return sum(math.prod(shape) * (len(layers) if layers is not None else 1) * tensor_dtype.itemsize
               for _, shape, layers, tensor_dtype, _ in _stored_tensors(cfg, scheme, DTYPES[dtype], None))


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A canonical tensor to write, read from its source block by block (never whole, when stacked)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layers: tuple[int, ...] | None  # the global layers stacked along the first axis (None: a global tensor)
    source: Any

    def blocks(self, rows: int) -> Iterator[tuple[int | slice, np.ndarray]]:
        """(index along the first axis, block in the stored dtype): one per layer, or `rows` rows at a time."""
        inner = tuple(slice(None) for _ in self.shape[1:])
        if self.layers is not None:
            for i, layer in enumerate(self.layers):
                yield i, self._cast(self.source.read(self.name, layer, inner))
            return
        for start in range(0, self.shape[0], rows):
            index = slice(start, min(start + rows, self.shape[0]))
            yield index, self._cast(self.source.read(self.name, None, (index, *inner)))

    def _cast(self, block: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(block, dtype=self.dtype)


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """orbax's numpy handler, writing each `_Tensor` layer by layer instead of from one array in memory.

    The stored arrays are ordinary `np.ndarray` entries (same type string, same read path), so the
    checkpoint restores with plain orbax too; each chunk gets a crc32c checksum.
    """

    def __init__(self, progress: Callable[[int], None] | None = None):
        super().__init__()
        self._progress = progress
        self._futures, self._stopped = [], False

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        future = ocp.future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args),
                                                                  name="moejax_streaming_write")
        self._futures.append(future)
        return [future]

    def stop(self, timeout_s: float = 60.0) -> None:
        """End the writes at the next block (as a cancellation, which orbax does not log) and wait for them."""
        self._stopped = True
        for future in self._futures:
            with contextlib.suppress(BaseException):
                future.result(timeout=timeout_s)

    async def _write(self, values, infos, args) -> None:
        for value, info, arg in zip(values, infos, args, strict=True):  # one at a time: bounded memory
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
                dtype=value.dtype, process_index=ocp.multihost.process_index(), arg=arg)
            store = await ts.open(ts.Spec(_with_checksums(spec)), create=True, open=True, context=info.ts_context)
            chunk_rows = store.chunk_layout.write_chunk.shape[0]
            row_bytes = int(np.prod(value.shape[1:])) * value.dtype.itemsize
            rows = max(chunk_rows, BLOCK_BYTES // max(row_bytes, 1) // chunk_rows * chunk_rows)
            for index, block in value.blocks(rows):
                if self._stopped:
                    raise asyncio.CancelledError
                await store[index].write(block)
                if self._progress:
                    self._progress(block.nbytes)


def _with_checksums(spec: dict) -> dict:
    """`spec` with a crc32c codec after the chunk codecs (inside the zarr3 sharding codec when there is one)."""
    metadata = spec["metadata"]
    codecs = metadata["codecs"]
    sharded = [c for c in codecs if c.get("name") == "sharding_indexed"]
    inner = sharded[0]["configuration"]["codecs"] if sharded else codecs
    if not any(c.get("name") == "crc32c" for c in inner):
        inner.append({"name": "crc32c"})
    return spec


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- reading ----------------------------------------------------------------------------------------


class OrbaxSource:
    """Serves canonical tensors from a moejax checkpoint, each read as the slice asked for.

    Everything is checked when it is opened, before any weight is read: orbax metadata present and
    parseable, the format version, the config, every stored tensor's name, shape and dtype (from its
    zarr metadata) against the config's canonical tensors, and the stored fingerprint against the one the
    metadata gives (so metadata from another checkpoint is refused, even with the same shapes). Chunk
    checksums are checked as slices are read, and NaN/inf values refused unless `allow_nonfinite` (a
    conversion may have let them through).
    """

    def __init__(self, path: str | Path, allow_nonfinite: bool = False):
        self.path = Path(path)
        self.allow_nonfinite = allow_nonfinite
        data, self.meta = _orbax_metadata(self.path)
        self.cfg = _config(self.path, self.meta)
        self.dtype = self.meta.get("dtype")
        if self.dtype not in DTYPES:
            raise CheckpointError(f"checkpoint {self.path}: stored dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        self.canonical = canonical_shapes(self.cfg)
        self._row = {name: {layer: i for i, layer in enumerate(layers)}  # global layer -> its row of the stack
                     for name, (_, layers) in self.canonical.items() if layers is not None}
        try:
            self.quantization = _scheme_of(self.meta.get("quantization"))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {self.path}: its quantization metadata is malformed ({err!r})") from None
        self._expected = {name: ((len(layers), *shape) if layers is not None else tuple(shape), tensor_dtype)
                          for name, shape, layers, tensor_dtype, _ in _stored_tensors(
                              self.cfg, self.quantization, DTYPES[self.dtype], None)}
        # stored quantized: the ones the model declares quantized (a scheme's tensor the model keeps float, MLA's
        # kv_b, was written dequantized)
        self.quantized = {name for name in self._expected if name + SCALE in self._expected}
        self._tiles = {name: tuple(v // t for v, t in zip(self._expected[name][0], self._expected[name + SCALE][0],
                                                          strict=True))[1:] for name in self.quantized}
        for name in self.quantized:
            self._row[name + SCALE] = self._row[name]
        names = _stored_names(self.path, data)
        self._stores = {name: self._open(name) for name in names if name in self._expected}
        self._check([n for n in names if n != FINGERPRINT])
        self._check_fingerprint(FINGERPRINT in names)

    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        shape = self._stores[name].shape[0 if layer is None else 1:]
        dtype = np.float32 if name in self.quantized else DTYPES[self.dtype]
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)], dtype)
        return self.read_into(name, layer, index, out)

    def read_into(self, name: str, layer: int | None, index: Index, out: np.ndarray) -> np.ndarray:
        """Fill `out` with the slice `index` of canonical tensor `name` (of `layer`); a quantized one dequantized."""
        if name not in self.quantized:
            return self._read_stored(name, layer, index, out)
        values = self._read_stored(name, layer, index, np.empty(out.shape, self._expected[name][1]))
        scale = self.read_quantized_into(name, "scale", layer, index, np.empty(out.shape, np.float32))
        out[...] = values.astype(np.float32) * scale
        return out

    def read_quantized_into(self, name: str, part: str, layer: int | None, index: Index,
                            out: np.ndarray) -> np.ndarray:
        """A quantized canonical tensor as stored: `part` "values" (their type) or "scale" (each element's scale,
        float32, same shape as the values), sliced by `index` in canonical coordinates."""
        if name not in self.quantized:
            raise KeyError(f"{name} is not stored quantized in {self.path}")
        if part == "values":
            return self._read_stored(name, layer, index, out)
        tiles = self._tiles[name]
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.canonical[name][0], strict=True)]
        first = tuple(slice(a // t, -(-b // t)) for (a, b), t in zip(bounds, tiles, strict=True))
        block = self._read_stored(name + SCALE, layer, first,
                                  np.empty([s.stop - s.start for s in first], np.float32))
        for axis, ((a, b), t) in enumerate(zip(bounds, tiles, strict=True)):  # one scale per element, then cut
            if t > 1:
                block = np.repeat(block, t, axis=axis)
            block = block.take(range(a - (a // t) * t, b - (a // t) * t), axis=axis)
        out[...] = block
        return out

    def _read_stored(self, name: str, layer: int | None, index: Index, out: np.ndarray) -> np.ndarray:
        """Fill `out` with the slice `index` of stored tensor `name` (of `layer`), read in pieces of whole chunks.

        tensorstore decodes every chunk a read touches and holds them until the read is done, so a slice is
        read in pieces of about `READ_BYTES` cut along the first axis its chunks split, at chunk boundaries:
        each chunk is decoded once, and a read holds about one piece.
        """
        store = self._stores[name]
        view = (store if layer is None else store[self._row[name][layer]])[index].translate_to[0]  # origin 0
        shape = tuple(store.shape[0 if layer is None else 1:])
        chunk = tuple(store.chunk_layout.read_chunk.shape[0 if layer is None else 1:])
        axis = next((a for a, (c, n) in enumerate(zip(chunk, shape, strict=True)) if c < n), 0)
        start, size = index[axis].indices(shape[axis])[0], out.shape[axis]
        line = max(1, out.nbytes // max(1, size))  # bytes per step along `axis`
        step = max(1, READ_BYTES // line // chunk[axis]) * chunk[axis]
        at = 0
        while at < size:
            end = min(size, (start + at) // step * step + step - start)  # the next multiple of `step`
            piece = (slice(None),) * axis + (slice(at, end),)
            try:
                block = view[piece].read().result()
            except (ValueError, OSError) as err:  # tensorstore reports data loss, checksum and range errors so
                raise CheckpointError(f"checkpoint {self.path}: tensor {_what(name, layer)} cannot be read: "
                                      f"{_ts_message(err)}") from None
            if not self.allow_nonfinite and not all_finite(block):
                raise CheckpointError(f"checkpoint {self.path}: tensor {_what(name, layer)} has non-finite values "
                                      f"(NaN or inf) in the block read; pass allow_nonfinite=True to load it anyway")
            out[piece] = block
            del block
            at = end
        return out

    def _check(self, names: list[str]) -> None:
        """Stored tensors (listed `names`, opened `_stores`) against the config's canonical tensors."""
        expected = {name: shape for name, (shape, _) in self._expected.items()}
        problems = [f"missing tensor {n} (expected shape {expected[n]})" for n in sorted(set(expected) - set(names))]
        problems += [f"unexpected tensor {n}" for n in sorted(set(names) - set(expected))]
        for n, store in sorted(self._stores.items()):
            dtype = store.dtype.numpy_dtype
            if tuple(store.shape) != expected[n]:
                problems.append(f"{n}: expected shape {expected[n]}, found {tuple(store.shape)}")
            elif dtype != self._expected[n][1]:
                problems.append(f"{n}: expected dtype {self._expected[n][1]}, found {dtype}")
        if problems:
            more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({self.cfg.family}, "
                                  f"{self.cfg.num_layers} layers): " + "; ".join(problems[:20]) + more)

    def _check_fingerprint(self, stored: bool) -> None:
        """The fingerprint stored with the tensors against the one computed from the metadata."""
        fix = "restore the checkpoint's own _METADATA, or convert the checkpoint again"
        if not stored:
            raise CheckpointError(f"checkpoint {self.path}: no {FINGERPRINT} tensor, so its metadata cannot be checked "
                                  f"against its tensors; {fix}")
        try:
            found = bytes(self._open(FINGERPRINT).read().result())
        except (ValueError, OSError) as err:
            raise CheckpointError(f"checkpoint {self.path}: tensor {FINGERPRINT} cannot be read: {_ts_message(err)}") \
                from None
        checkpoint_id = self.meta.get("checkpoint_id")
        if not isinstance(checkpoint_id, str) or found != _fingerprint(self.cfg, self.dtype, checkpoint_id,
                                                                        self.meta.get("quantization")):
            raise CheckpointError(
                f"checkpoint {self.path}: its metadata ({self.path / '_METADATA'}: model {self.cfg.name or '?'}, "
                f"{self.cfg.family}) was not written with its tensors (the fingerprint stored with the tensors "
                f"differs from the metadata's): it was copied from another checkpoint or edited; {fix}")

    def _open(self, name: str):
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.path.absolute()),
                                           is_ocdbt_checkpoint=True, use_zarr3=True, ts_context=_context())
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
        try:
            return ts.open(spec, open=True, read=True, context=_context()).result()
        except (ValueError, OSError) as err:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} cannot be opened: {_ts_message(err)}") \
                from None


def _ts_message(err: Exception) -> str:
    """A tensorstore error without the full JSON spec it appends."""
    return str(err).split(" [tensorstore_spec=")[0]


def _what(name: str, layer: int | None) -> str:
    return name if layer is None else f"{name} (layer {layer})"


def _context():
    """One tensorstore context for every read: a small shared B-tree node cache, decoded chunks not cached.

    Chunks are decoded on one thread: with several, each thread's malloc arena kept the buffers it freed,
    which raised host memory while loading (docs/benchmarks.md); `weights.place` reads one slice at a time
    anyway.
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 1},
                               "cache_pool#ocdbt": {"total_bytes_limit": OCDBT_CACHE_BYTES}})
    return _CONTEXT


_CONTEXT = None


def _orbax_metadata(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(orbax's `_METADATA` as JSON, its "moejax" entry), checked: files present, format, version.

    Read as a file, without orbax's asynchronous machinery, so that the CLI can check a checkpoint before
    JAX starts.
    """
    for required in ("_CHECKPOINT_METADATA", "_METADATA"):
        if not os.path.lexists(path / required):
            raise CheckpointError(f"checkpoint {path} is incomplete: {path / required} is missing")
    file = path / "_METADATA"
    data = read_json(file, "orbax metadata")
    custom = data.get("custom_metadata")
    meta = custom.get("moejax") if isinstance(custom, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is an orbax checkpoint but not a moejax one (no 'moejax' entry of "
                              f"format {FORMAT!r} in the custom metadata of {file}); write one with moejax convert")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        advice = "upgrade moejax" if isinstance(version, int) and version > FORMAT_VERSION else "convert it again"
        raise CheckpointError(f"checkpoint {path} has moejax format version {version!r}; this moejax reads version "
                              f"{FORMAT_VERSION}: {advice}")
    return data, meta


def _stored_names(path: Path, data: dict[str, Any]) -> list[str]:
    """The tensor names orbax's metadata lists (its `tree_metadata`: one entry per leaf, keyed by its path)."""
    tree = data.get("tree_metadata")
    try:
        names = [".".join(str(k["key"]) for k in entry["key_metadata"]) for entry in tree.values()]
    except (AttributeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: the tensor list (tree_metadata) of {path / '_METADATA'} is "
                              f"malformed") from None
    return names


def _config(path: Path, meta: dict[str, Any]) -> ModelConfig:
    data = meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata has no model config")
    try:
        cfg = ModelConfig.from_dict(data)
        cfg.check_runtime_support()
        if meta.get("dtype") in DTYPES:  # the checkpoint's own dtype: what dtype="auto" serves in
            cfg = cfg.replace(dtype=meta["dtype"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its model config does not match this moejax: {err}") from None
    return cfg
