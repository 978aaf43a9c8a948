"""The file layer of the checkpoint loader: JSON files, safetensors headers, memory-mapped tensors.

Every malformed input is a `CheckpointError` naming the file (and tensor) and what is wrong; a
missing file is a `FileNotFoundError` naming it. Invariants:
- only regular files are opened (a FIFO, device or directory is refused after `os.stat`, never
  opened), and paths are resolved strictly first, so a symlink loop is an error, not a hang;
- index entries stay inside the checkpoint directory (no absolute paths, no `..`); the files
  themselves may be symlinks elsewhere (the Hugging Face cache links snapshots to blobs);
- every header is checked in full before any tensor byte is read: entry types, dtype, shape,
  span length == prod(shape) * itemsize, spans inside the file and not overlapping; then
  `safetensors.safe_open` validates the file again as the format's reference reader;
- with an index, its `weight_map` decides which file serves each tensor it lists (files it does
  not name are not read); a tensor it does not list, or any tensor without an index, must be in
  one file only.
Tensors are read with `read_rows`: a range of rows (along the first axis) straight from the file into a
new array, so only the bytes asked for are read and no file page stays mapped into the process
(`open_tensor`, a memory-mapped view, is kept for inspection).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
# The storage types of quantized checkpoints' values and scales (`moejax.checkpoint.quantized`): read, and
# accepted by the loader only where the checkpoint's quantization_config puts them.
QUANTIZED_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "I8": np.int8, "U8": np.uint8,
                    "F8_E8M0": ml_dtypes.float8_e8m0fnu}
STORED_DTYPES = DTYPES | QUANTIZED_DTYPES
# Other safetensors dtypes: known to the format, refused by the loader (itemsize for the span check).
_NOT_FLOAT = {"BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_UNSUPPORTED = {"C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_MAX_JSON_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that is malformed or does not match its config."""


class TensorEntry(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int  # absolute byte offset of the tensor's data in `file`


# ---- files ---------------------------------------------------------------------------------------


def regular_file_size(file: Path, what: str) -> int:
    """Size of `file`, which must resolve (no loop) to a regular file; stat only, nothing is opened."""
    try:
        real = Path(file).resolve(strict=True)
        mode, size = (st := os.stat(real)).st_mode, st.st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {file} does not exist") from None
    except RuntimeError as e:  # Python < 3.13 reports a symlink loop as RuntimeError
        raise CheckpointError(f"{what} {file} cannot be resolved: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{what} {file} cannot be resolved: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
        kind = next((k for test, k in kinds if test(mode)), "not a regular file")
        raise CheckpointError(f"{what} {file} is {kind}, not a regular file")
    return size


def _read_bytes(file: Path, what: str, start: int, count: int) -> bytes:
    try:
        with open(file, "rb") as f:
            f.seek(start)
            return f.read(count)
    except OSError as e:
        raise CheckpointError(f"{what} {file} cannot be read: {e.strerror or e}") from None


def read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from `file` (config.json, the index), every failure a clear error naming the file."""
    size = regular_file_size(file, what)
    if size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{what} {file} is {size} bytes, over the {_MAX_JSON_BYTES} byte limit for a JSON file")
    try:
        text = _read_bytes(file, what, 0, size).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {file} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")  # both: ran out of text
        raise CheckpointError(f"{what} {file} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})"
                              + (", truncated?" if truncated else "")) from None
    except RecursionError:
        raise CheckpointError(f"{what} {file} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {file} must hold a JSON object, found {type(data).__name__}")
    return data


# ---- safetensors headers -------------------------------------------------------------------------


def read_header(file: Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry for one safetensors file, after checking the whole header against the file."""
    what = "safetensors file"
    size = regular_file_size(file, what)
    if size < 8:
        raise CheckpointError(f"{what} {file} is truncated: {size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", _read_bytes(file, what, 0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{what} {file} has a corrupt header: header length {header_len} bytes is over the "
                              f"{MAX_HEADER_BYTES} byte limit")
    if 8 + header_len > size:
        raise CheckpointError(f"{what} {file} is truncated or corrupt: header length {header_len} bytes runs past "
                              f"the end of the {size}-byte file")
    raw = _read_bytes(file, what, 8, header_len)
    header = _parse_header(file, raw)
    data_size = size - 8 - header_len
    entries = {name: _entry(file, name, info, 8 + header_len, data_size)
               for name, info in header.items() if name != "__metadata__"}
    _check_overlaps(file, entries, 8 + header_len)
    _validate_with_library(file)
    return entries


def _parse_header(file: Path, raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise CheckpointError(f"safetensors file {file} has a corrupt header: key {twice!r} appears twice")
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"safetensors file {file} has a corrupt header: not UTF-8 ({e.reason} at byte "
                              f"{e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        detail = f"{e.msg}, line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else "too deep"
        raise CheckpointError(f"safetensors file {file} has a corrupt header: not valid JSON ({detail})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {file} has a corrupt header: expected a JSON object, found "
                              f"{type(header).__name__}")
    return header


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(file: Path, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"safetensors file {file}: tensor {name!r} {problem}")

    if not isinstance(info, dict):
        raise bad(f"has a header entry that is not an object ({type(info).__name__})")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"has no {', '.join(missing)} in its header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}, not a string")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of integers")
    if any(d < 0 for d in shape):
        raise bad(f"has a negative dimension in shape {shape}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"has data_offsets {offsets!r}, not a list of two integers [start, end]")
    if dtype in STORED_DTYPES:
        itemsize = np.dtype(STORED_DTYPES[dtype]).itemsize
    elif dtype in _NOT_FLOAT:
        raise bad(f"has dtype {dtype}, which is not a floating type (expected one of {sorted(DTYPES)})")
    elif dtype in _UNSUPPORTED:
        raise bad(f"has dtype {dtype}, which moejax cannot load (expected one of {sorted(DTYPES)})")
    else:
        raise bad(f"has unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    start, end = offsets
    if start < 0 or end < start:
        raise bad(f"has data_offsets [{start}, {end}]: the end comes before the start")
    if end > data_size:
        raise bad(f"has data_offsets [{start}, {end}] beyond the end of the data ({data_size} bytes): the file is "
                  f"truncated or the header is corrupt")
    want = math.prod(shape) * itemsize
    if end - start != want:
        raise bad(f"spans {end - start} bytes (data_offsets [{start}, {end}]), but shape {shape} of {dtype} needs "
                  f"{want} bytes")
    return TensorEntry(Path(file), tuple(shape), dtype, data_start + start)


def _check_overlaps(file: Path, entries: dict[str, TensorEntry], data_start: int) -> None:
    spans = sorted((e.offset, e.offset + math.prod(e.shape) * np.dtype(STORED_DTYPES[e.dtype]).itemsize, name)
                   for name, e in entries.items() if math.prod(e.shape))
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            how = "share the same bytes" if (s0, e0) == (s1, e1) else "overlap"
            raise CheckpointError(f"safetensors file {file}: tensors {a!r} (data_offsets [{s0 - data_start}, "
                                  f"{e0 - data_start}]) and {b!r} (data_offsets [{s1 - data_start}, "
                                  f"{e1 - data_start}]) {how}")


def _validate_with_library(file: Path) -> None:
    """The format's reference reader checks what the checks above do not (gaps, metadata, trailing bytes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"safetensors file {file} is not a valid safetensors file: {e}") from None


# ---- the checkpoint's tensors --------------------------------------------------------------------


def tensor_files(path: Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry over the checkpoint's safetensors files (headers only, no tensor data read)."""
    index = path / INDEX
    if os.path.lexists(index):
        return _indexed_files(path, index)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return _merge({file.name: read_header(file) for file in files}, path, note=f" and there is no {INDEX} to choose")


def _indexed_files(path: Path, index: Path) -> dict[str, TensorEntry]:
    weight_map = read_json(index, "index").get("weight_map")
    if not isinstance(weight_map, dict):
        kind = type(weight_map).__name__
        problem = "has no weight_map" if weight_map is None else f"has a weight_map that is a {kind}"
        raise CheckpointError(f"index {index} {problem}, not an object of tensor name -> file")
    if not weight_map:
        raise CheckpointError(f"index {index} has an empty weight_map: it lists no tensors")
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"index {index}: weight_map entry for tensor {name!r} is {rel!r}, not a file name")
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise CheckpointError(f"index {index}: weight_map entry {rel!r} for tensor {name!r} leaves the checkpoint "
                                  f"directory (file names must be relative, without '..')")
    headers = {}
    for rel in sorted(set(weight_map.values())):
        if not os.path.lexists(path / rel):
            raise FileNotFoundError(f"index {index} lists {rel}, which does not exist")
        headers[rel] = read_header(path / rel)
    out = {}
    for name, rel in weight_map.items():
        if name not in headers[rel]:
            raise CheckpointError(f"index {index} maps tensor {name!r} to {rel}, which does not contain it")
        out[name] = headers[rel][name]
    unlisted = {rel: {n: e for n, e in h.items() if n not in weight_map} for rel, h in headers.items()}
    return out | _merge(unlisted, path, note=f" and {INDEX} does not list it")


def _merge(headers: dict[str, dict[str, TensorEntry]], path: Path, note: str) -> dict[str, TensorEntry]:
    out, where = {}, {}
    for rel, entries in headers.items():
        for name, entry in entries.items():
            if name in out:
                raise CheckpointError(f"checkpoint {path}: tensor {name!r} is in both {where[name]} and {rel}{note}; "
                                      f"remove one copy")
            out[name], where[name] = entry, rel
    return out


def open_tensor(name: str, entry: TensorEntry) -> np.ndarray:
    """A read-only memory-mapped view of one stored tensor (bytes are read only when sliced)."""
    dtype = STORED_DTYPES[entry.dtype]
    if math.prod(entry.shape) == 0:
        return np.zeros(entry.shape, dtype)
    try:
        return np.memmap(entry.file, dtype=dtype, mode="r", offset=entry.offset, shape=entry.shape)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"safetensors file {entry.file}: tensor {name!r} cannot be mapped "
                              f"(file changed since it was checked?): {e}") from None


def read_rows(name: str, entry: TensorEntry, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a stored tensor (its first axis), read from the file into a new array.

    Read into the array rather than through a memory map: a mapped file's pages count in the process's
    resident memory while it is mapped, a read's pages are only the kernel's cache.
    """
    out = np.empty((stop - start, *entry.shape[1:]), STORED_DTYPES[entry.dtype])
    if out.size == 0:
        return out
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(entry.offset + start * (out.nbytes // (stop - start)))
            done = 0
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise CheckpointError(f"safetensors file {entry.file}: tensor {name!r} ends early (file changed "
                                          f"since it was checked?)")
                done += n
    except OSError as e:
        raise CheckpointError(f"safetensors file {entry.file}: tensor {name!r} cannot be read: {e.strerror or e}") \
            from None
    return out


def all_finite(block: np.ndarray) -> bool:
    """No NaN or inf in `block`, found without a temporary the size of it (NaN propagates through min)."""
    if block.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(block.min()) and np.isfinite(block.max()))
