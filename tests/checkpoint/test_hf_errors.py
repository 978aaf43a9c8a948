"""Malformed Hugging Face checkpoints: each one is a clear error naming the file (and tensor) and the problem.

Every case starts from a copy of the tiny random Mixtral checkpoint and corrupts one thing, then calls
`moejax.load`. No raw JSONDecodeError, struct.error, KeyError or numpy mmap message may escape, and
nothing may hang on a FIFO.
"""

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

import moejax
from moejax.checkpoint.hf import CheckpointError, HFSource
from tests import hf_models

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
EMBED = "model.embed_tokens.weight"  # (128, 48) float32
W1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"  # (32, 48)
W3 = "model.layers.0.block_sparse_moe.experts.0.w3.weight"  # (32, 48)


# ---- helpers: read and rewrite a safetensors file byte by byte -----------------------------------


def _split(file):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(file, header, data, header_bytes=None):
    hb = json.dumps(header).encode() if header_bytes is None else header_bytes
    file.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def _edit_header(edit):
    def corrupt(ckpt):
        header, data = _split(ckpt / ST)
        edit(header)
        _write(ckpt / ST, header, data)

    return corrupt


def _edit_entry(name, **fields):
    return _edit_header(lambda h: h[name].update(fields))


def _raw(make):
    """Replace model.safetensors with the bytes `make(original bytes)` returns."""

    def corrupt(ckpt):
        (ckpt / ST).write_bytes(make((ckpt / ST).read_bytes()))

    return corrupt


def _header_bytes(hb):
    def corrupt(ckpt):
        _, data = _split(ckpt / ST)
        _write(ckpt / ST, None, data, header_bytes=hb)

    return corrupt


def _edit_config(edit):
    def corrupt(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        edit(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))

    return corrupt


def _write_file(name, text):
    return lambda ckpt: (ckpt / name).write_bytes(text if isinstance(text, bytes) else text.encode())


def _replace(name, make):
    """Replace `name` in the checkpoint by what `make(path)` creates there (a FIFO, a directory, a link)."""

    def corrupt(ckpt):
        (ckpt / name).unlink()
        make(ckpt / name)

    return corrupt


def _loop(path):
    os.symlink(path.parent / "loop_b", path)
    os.symlink(path, path.parent / "loop_b")


def _index(weight_map=None, body=None):
    """Write an index (by default every tensor -> model.safetensors, then `weight_map` updates it)."""

    def corrupt(ckpt):
        if body is not None:
            (ckpt / INDEX).write_text(body)
            return
        header, _ = _split(ckpt / ST)
        wm = {n: ST for n in header if n != "__metadata__"}
        (ckpt / INDEX).write_text(json.dumps({"weight_map": wm | (weight_map or {})}))

    return corrupt


def _second_file_with(name, index_maps_to=None):
    """Copy tensor `name` into extra.safetensors (and optionally write an index choosing a file)."""

    def corrupt(ckpt):
        from safetensors.numpy import load_file, save_file

        save_file({name: load_file(ckpt / ST)[name]}, ckpt / "extra.safetensors")
        if index_maps_to is not None:
            _index({name: index_maps_to})(ckpt)

    return corrupt


def _drop_from_index(name):
    def corrupt(ckpt):
        _index()(ckpt)
        index = json.loads((ckpt / INDEX).read_text())
        del index["weight_map"][name]
        (ckpt / INDEX).write_text(json.dumps(index))

    return corrupt


def _overlap(ckpt):
    header, data = _split(ckpt / ST)
    start, end = header[W1]["data_offsets"]
    header[W3]["data_offsets"] = [start + 4, end + 4]
    _write(ckpt / ST, header, data)


def _alias(ckpt):
    header, data = _split(ckpt / ST)
    header[W3]["data_offsets"] = header[W1]["data_offsets"]
    _write(ckpt / ST, header, data)


def _duplicate_key(ckpt):
    header, data = _split(ckpt / ST)
    hb = json.dumps(header).encode()
    entry = json.dumps({EMBED: header[EMBED]}).encode()[1:-1]
    _write(ckpt / ST, None, data, header_bytes=hb[:-1] + b", " + entry + b"}")


# ---- the table of bad inputs ---------------------------------------------------------------------

F = re.escape(ST)
E = re.escape(f"'{EMBED}'")
CASES = {
    # config.json
    "config-missing": (lambda c: (c / "config.json").unlink(), FileNotFoundError, "no config.json"),
    "config-truncated": (lambda c: (c / "config.json").write_text((c / "config.json").read_text()[:40]),
                         CheckpointError, r"config .*config\.json is not valid JSON: .*, truncated\?"),
    "config-not-json": (_write_file("config.json", "model_type: mixtral"), CheckpointError,
                        r"config\.json is not valid JSON: Expecting value \(line 1 column 1\)"),
    "config-not-object": (_write_file("config.json", "[1, 2]"), CheckpointError,
                          r"config\.json must hold a JSON object, found list"),
    "config-not-utf8": (_write_file("config.json", b'{"model_type": "\xff"}'), CheckpointError,
                        r"config\.json is not UTF-8 text"),
    "config-missing-key": (_edit_config(lambda c: c.pop("hidden_size")), CheckpointError,
                           r"config .*config\.json has no 'hidden_size' entry"),
    "config-unsupported": (_edit_config(lambda c: c.update(model_type="llama")), CheckpointError,
                           r"config .*config\.json: Hugging Face model_type 'llama' is not supported"),
    "config-directory": (_replace("config.json", os.mkdir), CheckpointError, r"config\.json is a directory"),
    "config-fifo": (_replace("config.json", os.mkfifo), CheckpointError, r"config\.json is a FIFO"),
    "config-symlink-loop": (_replace("config.json", _loop), CheckpointError, r"config\.json cannot be resolved"),
    # the safetensors header
    "file-shorter-than-8-bytes": (_raw(lambda b: b[:3]), CheckpointError,
                                  rf"{F} is truncated: 3 bytes, shorter than the 8-byte header length"),
    "empty-file": (_raw(lambda b: b""), CheckpointError, rf"{F} is truncated: 0 bytes"),
    "header-length-absurd": (_raw(lambda b: struct.pack("<Q", 2**62) + b[8:]), CheckpointError,
                             rf"{F} has a corrupt header: header length {2**62} bytes is over the 100000000 byte"),
    "header-length-past-eof": (_raw(lambda b: struct.pack("<Q", len(b)) + b[8:]), CheckpointError,
                               rf"{F} is truncated or corrupt: header length \d+ bytes runs past the end"),
    "truncated-in-header": (_raw(lambda b: b[:40]), CheckpointError, rf"{F} is truncated or corrupt"),
    "header-not-json": (_header_bytes(b"not json at all"), CheckpointError,
                        rf"{F} has a corrupt header: not valid JSON"),
    "header-not-utf8": (_header_bytes(b'{"\xff": 1}'), CheckpointError, rf"{F} has a corrupt header: not UTF-8"),
    "header-not-object": (_header_bytes(b"[1, 2, 3]"), CheckpointError,
                          rf"{F} has a corrupt header: expected a JSON object, found list"),
    "header-duplicate-key": (_duplicate_key, CheckpointError, rf"{F} has a corrupt header: key {E} appears twice"),
    "entry-not-object": (_edit_header(lambda h: h.update({EMBED: 5})), CheckpointError,
                         rf"{F}: tensor {E} has a header entry that is not an object \(int\)"),
    "entry-missing-dtype": (_edit_header(lambda h: h[EMBED].pop("dtype")), CheckpointError,
                            rf"{F}: tensor {E} has no dtype in its header entry"),
    "entry-missing-offsets": (_edit_header(lambda h: h[EMBED].pop("data_offsets")), CheckpointError,
                              rf"{F}: tensor {E} has no data_offsets in its header entry"),
    "dtype-not-string": (_edit_entry(EMBED, dtype=7), CheckpointError, rf"{F}: tensor {E} has dtype 7, not a string"),
    "shape-not-list": (_edit_entry(EMBED, shape="128x48"), CheckpointError,
                       rf"{F}: tensor {E} has shape '128x48', not a list of integers"),
    "shape-float-dims": (_edit_entry(EMBED, shape=[128.0, 48]), CheckpointError,
                         rf"{F}: tensor {E} has shape \[128.0, 48\], not a list of integers"),
    "shape-negative-dim": (_edit_entry(EMBED, shape=[-128, -48]), CheckpointError,
                           rf"{F}: tensor {E} has a negative dimension in shape \[-128, -48\]"),
    "offsets-not-pair": (_edit_entry(EMBED, data_offsets=[0]), CheckpointError,
                         rf"{F}: tensor {E} has data_offsets \[0\], not a list of two integers"),
    "offsets-bools": (_edit_entry(EMBED, data_offsets=[False, True]), CheckpointError,
                      rf"{F}: tensor {E} has data_offsets \[False, True\], not a list of two integers"),
    "dtype-unknown": (_edit_entry(EMBED, dtype="Q9"), CheckpointError, rf"{F}: tensor {E} has unknown dtype 'Q9'"),
    "dtype-integer": (_edit_entry(EMBED, dtype="I32"), CheckpointError,
                      rf"{F}: tensor {E} has dtype I32, which is not a floating type"),
    "dtype-fp8": (_edit_entry(EMBED, dtype="F8_E5M2"), CheckpointError,  # F8_E4M3: tests/test_quantized_checkpoints
                  rf"{F}: tensor {E} has dtype F8_E5M2, which moejax cannot load"),
    # data spans
    "offsets-end-before-start": (_edit_header(lambda h: h[EMBED].update(data_offsets=h[EMBED]["data_offsets"][::-1])),
                                 CheckpointError, rf"{F}: tensor {E} has data_offsets .*the end comes before"),
    "offsets-out-of-range": (_edit_entry(EMBED, data_offsets=[2**40, 2**40 + 128 * 48 * 4]), CheckpointError,
                             rf"{F}: tensor {E} has data_offsets \[{2**40}, \d+\] beyond the end of the data"),
    "file-truncated-in-data": (_raw(lambda b: b[:-100]), CheckpointError,
                               rf"{F}: tensor '.*' has data_offsets .* beyond the end of the data .*truncated"),
    "span-shorter-than-shape": (_edit_entry(EMBED, shape=[128, 49]), CheckpointError,
                                rf"{F}: tensor {E} spans 24576 bytes .* but shape \[128, 49\] of F32 needs 25088"),
    "span-wrong-dtype-size": (_edit_entry(EMBED, dtype="F16"), CheckpointError,
                              rf"{F}: tensor {E} spans 24576 bytes .* needs 12288 bytes"),
    "spans-overlap": (_overlap, CheckpointError, rf"{F}: tensors '.*' .* and '.*' .* overlap"),
    "spans-aliased": (_alias, CheckpointError, rf"{F}: tensors '.*w[13].weight' .* and '.*w[13].weight' .* share the "
                                               r"same bytes"),
    "trailing-bytes": (_raw(lambda b: b + b"\0" * 64), CheckpointError,
                       rf"{F} is not a valid safetensors file: .*not fully covered"),
    "metadata-not-strings": (_edit_header(lambda h: h.update(__metadata__={"format": 1})), CheckpointError,
                             rf"{F} is not a valid safetensors file: .*"),
    # the set of files
    "no-safetensors-files": (lambda c: (c / ST).unlink(), FileNotFoundError, r"no \*\.safetensors files in"),
    "file-is-directory": (_replace(ST, os.mkdir), CheckpointError, rf"{F} is a directory, not a regular file"),
    "file-is-fifo": (_replace(ST, os.mkfifo), CheckpointError, rf"{F} is a FIFO, not a regular file"),
    "file-is-device": (_replace(ST, lambda p: os.symlink("/dev/null", p)), CheckpointError,
                       rf"{F} is a character device, not a regular file"),
    "file-symlink-loop": (_replace(ST, _loop), CheckpointError, rf"{F} cannot be resolved: .*loop"),
    "file-dangling-symlink": (_replace(ST, lambda p: os.symlink(p.parent / "gone", p)), FileNotFoundError,
                              rf"{F} does not exist"),
    "tensor-in-two-files": (_second_file_with(EMBED), CheckpointError,
                            rf"tensor {E} is in both extra\.safetensors and {F} and there is no {re.escape(INDEX)}"),
    # the index
    "index-truncated": (_index(body='{"weight_map": {"a": "mod'), CheckpointError,
                        r"index .*index\.json is not valid JSON: .*, truncated\?"),
    "index-not-object": (_index(body='"model.safetensors"'), CheckpointError,
                         r"index\.json must hold a JSON object, found str"),
    "index-no-weight-map": (_index(body='{"metadata": {}}'), CheckpointError, r"index\.json has no weight_map"),
    "index-weight-map-list": (_index(body='{"weight_map": ["model.safetensors"]}'), CheckpointError,
                              r"index\.json has a weight_map that is a list"),
    "index-weight-map-empty": (_index(body='{"weight_map": {}}'), CheckpointError,
                               r"index\.json has an empty weight_map"),
    "index-value-not-string": (_index({EMBED: 3}), CheckpointError,
                               rf"index\.json: weight_map entry for tensor {E} is 3, not a file name"),
    "index-parent-dir": (_index({EMBED: "../model.safetensors"}), CheckpointError,
                         rf"weight_map entry '\.\./model\.safetensors' for tensor {E} leaves the checkpoint directory"),
    "index-absolute-path": (_index({EMBED: "/etc/passwd"}), CheckpointError,
                            rf"weight_map entry '/etc/passwd' for tensor {E} leaves the checkpoint directory"),
    "index-missing-file": (_index({EMBED: "model-00002.safetensors"}), FileNotFoundError,
                           r"index .* lists model-00002\.safetensors, which does not exist"),
    "index-tensor-not-in-file": (lambda c: (_second_file_with(W1)(c), _index({EMBED: "extra.safetensors"})(c)),
                                 CheckpointError, rf"maps tensor {E} to extra\.safetensors, which does not contain it"),
    "index-unlisted-duplicate": (lambda c: (_second_file_with(EMBED)(c), _drop_from_index(EMBED)(c),
                                            _index_add_extra(c)),
                                 CheckpointError, rf"tensor {E} is in both .* and .* and {re.escape(INDEX)} does not "
                                                  r"list it"),
    "index-file-is-fifo": (lambda c: (os.mkfifo(c / "fifo.safetensors"), _index({EMBED: "fifo.safetensors"})(c)),
                           CheckpointError, r"fifo\.safetensors is a FIFO, not a regular file"),
}


def _index_add_extra(ckpt):
    """List extra.safetensors in the index (for one other tensor it also holds)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt / "extra.safetensors") | {W1: load_file(ckpt / ST)[W1]}
    save_file(tensors, ckpt / "extra.safetensors")
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"][W1] = "extra.safetensors"
    (ckpt / INDEX).write_text(json.dumps(index))


@pytest.fixture()
def ckpt(hf_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["mixtral"][0], dst)
    return dst


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoint_is_a_clear_error(case, ckpt):
    corrupt, error, pattern = CASES[case]
    corrupt(ckpt)
    with pytest.raises(error, match=pattern) as info:
        moejax.load(ckpt)
    assert type(info.value) in (CheckpointError, FileNotFoundError)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, (CheckpointError, OSError))


# ---- valid checkpoints still load; the index decides; non-finite weights -------------------------


def test_index_decides_which_file_serves_a_duplicated_tensor(ckpt, hf_checkpoints):
    """extra.safetensors holds a different embedding; the index picks it, and a file it does not name is not read."""
    from safetensors.numpy import load_file, save_file

    embed = load_file(ckpt / ST)[EMBED]
    save_file({EMBED: embed[::-1].copy()}, ckpt / "extra.safetensors")
    _index({EMBED: "extra.safetensors"})(ckpt)
    (ckpt / "junk.safetensors").write_bytes(b"not read")
    source = HFSource(ckpt)
    np.testing.assert_array_equal(source.tensor(EMBED), embed[::-1])
    assert source.files[EMBED].file.name == "extra.safetensors"
    _index({EMBED: ST})(ckpt)
    np.testing.assert_array_equal(HFSource(ckpt).tensor(EMBED), embed)
    ids = np.arange(12).reshape(1, 12)
    ref = hf_models.hf_logits(hf_checkpoints["mixtral"][1], ids)
    np.testing.assert_allclose(moejax.load(ckpt).forward(ids), ref, atol=1e-4, rtol=0)


def test_checkpoint_through_symlinks_loads(ckpt, tmp_path):
    """Files may be symlinks out of the directory (the Hugging Face cache links snapshots to blobs)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (ckpt / ST).rename(blobs / "abc123")
    os.symlink(blobs / "abc123", ckpt / ST)
    assert sorted(HFSource(ckpt).files) == sorted(HFSource(ckpt).expected())


def _poison(ckpt, name, row, value):
    header, data = _split(ckpt / ST)
    start, _ = header[name]["data_offsets"]
    width = header[name]["shape"][1]
    data = bytearray(data)
    at = start + row * width * 4
    data[at : at + 4] = np.float32(value).tobytes()
    _write(ckpt / ST, header, bytes(data))


def test_nan_weight_is_reported_by_name_and_allowed_with_the_flag(ckpt):
    _poison(ckpt, EMBED, 5, np.nan)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(EMBED)} \(embed\) has 1 non-finite value\(s\) "
                                              r"\(NaN or inf\) .* allow_nonfinite=True"):
        moejax.load(ckpt)
    model = moejax.load(ckpt, allow_nonfinite=True)
    assert np.isnan(model.forward([[5, 1]])).all(axis=-1)[0, 0]
    assert np.isfinite(model.forward([[1, 2]])).all()


def test_inf_expert_weight_is_reported_by_name(ckpt):
    name = "model.layers.2.block_sparse_moe.experts.6.w2.weight"
    _poison(ckpt, name, 3, -np.inf)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} has 1 non-finite value"):
        moejax.load(ckpt, layout="EP2")
    source = HFSource(ckpt, allow_nonfinite=True)
    assert np.isinf(source.read("moe.wd", 2, (slice(6, 7), slice(None), slice(None)))).any()


def test_nonfinite_check_reads_only_the_block(ckpt):
    """The check runs on the blocks read: a block that avoids the bad row passes."""
    _poison(ckpt, EMBED, 100, np.inf)
    source = HFSource(ckpt)
    assert source.read("embed", None, (slice(0, 64), slice(None))).shape == (64, 48)
    with pytest.raises(CheckpointError, match=re.escape(EMBED)):
        source.read("embed", None, (slice(64, 128), slice(None)))


def test_file_layer_reads_bf16_and_empty_tensors(tmp_path):
    """bfloat16 (which safetensors cannot hand to numpy) and zero-size tensors come back through the memmap reader."""
    import ml_dtypes

    from moejax.checkpoint.safetensors_files import open_tensor, tensor_files

    values = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
              "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [12, 12]}}
    _write(tmp_path / "x.safetensors", header, values.tobytes())
    files = tensor_files(tmp_path)
    assert files["a"].shape == (2, 3) and files["a"].dtype == "BF16"
    np.testing.assert_array_equal(open_tensor("a", files["a"]), values)
    assert open_tensor("empty", files["empty"]).shape == (0, 4)


def test_file_truncated_after_it_was_checked_is_a_clear_error(ckpt):
    """Tensors are read from the file as they are placed: a file cut short since its header was checked is an error
    naming the tensor that runs past its end, not zeros."""
    from moejax.checkpoint.safetensors_files import read_rows

    source = HFSource(ckpt)
    name, entry = max(source.files.items(), key=lambda item: item[1].offset)  # the last tensor in the file
    os.truncate(ckpt / ST, entry.offset + 4)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(repr(name))} ends early \(file changed since"):
        read_rows(name, entry, 0, entry.shape[0])
