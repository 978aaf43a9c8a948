"""moejax checkpoints (orbax): HF -> `moejax convert` -> `moejax.load` under any layout, exactly as a HF load.

A converted checkpoint is layout-independent: it is restored under layouts it was never written for,
each device reading its own slices; every corrupt, truncated or incomplete part is a clear error
naming the file or tensor.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import moejax
from moejax.checkpoint import hf as hf_module
from moejax.checkpoint import store
from moejax.checkpoint.families.forms import Experts
from moejax.checkpoint.hf import CheckpointError, HFSource
from moejax.cli import main
from moejax.weights import RandomSource

FAMILY = "qwen2_moe"  # the most tensor kinds: q/k/v biases, a gated shared expert
IDS = np.random.default_rng(11).integers(0, 128, (3, 10))


@pytest.fixture(scope="module")
def hf_dir(hf_checkpoints):
    return hf_checkpoints[FAMILY][0]


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """`moejax convert` of the tiny Qwen2-MoE checkpoint, float32."""
    out = tmp_path_factory.mktemp("store") / "ckpt"
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    return out


# ---- HF -> orbax -> any layout: the same weights, the same logits -----------------------------------


@pytest.mark.parametrize("layout", ["DP1", "TP4PP2", "DP2EP4"])
def test_load_equals_hf_load_bitwise(layout, converted, hf_dir, models_1dev):
    """DP1: nothing split; TP4PP2: kv heads repeated, 3 layers padded to 2 stages; DP2EP4: experts split."""
    restored = moejax.load(converted, layout=layout)
    direct = models_1dev[FAMILY] if layout == "DP1" else moejax.load(hf_dir, layout=layout)
    for (path, a), (_, b) in zip(_leaves(restored.params), _leaves(direct.params), strict=True):
        assert a.sharding == b.sharding, path
        assert all(np.array_equal(x.data, y.data) for x, y in zip(a.addressable_shards, b.addressable_shards,
                                                                    strict=True)), path
    np.testing.assert_array_equal(restored.forward(IDS), direct.forward(IDS))


@pytest.mark.parametrize("layout", ["TP4MTP1EP8", "TP2MTP4EP2"])
def test_split_layout_restores_as_hf_load_with_dp1_logits(layout, converted, hf_dir, models_1dev):
    """A split layout (the MoE split apart from attention, `moejax.mesh.Layout.split`) restores from the orbax
    checkpoint as from HF: the same shards; the logits of the 1-device model (<= 1e-5). TP4MTP1EP8: attention TP
    becomes expert parallelism (kv heads repeated, tokens exchanged); TP2MTP4EP2: requests split over the MoE's
    tensor group (tokens gathered), the gated shared expert over attention's tensor split."""
    restored = moejax.load(converted, layout=layout)
    assert restored.layout.split and restored.layout == moejax.Layout.parse(layout)
    direct = moejax.load(hf_dir, layout=layout)
    for (path, a), (_, b) in zip(_leaves(restored.params), _leaves(direct.params), strict=True):
        assert a.sharding == b.sharding, path
        assert all(np.array_equal(x.data, y.data) for x, y in zip(a.addressable_shards, b.addressable_shards,
                                                                    strict=True)), path
    np.testing.assert_allclose(restored.forward(IDS), models_1dev[FAMILY].forward(IDS), rtol=1e-5, atol=1e-5)


def _leaves(params):
    import jax

    return jax.tree_util.tree_flatten_with_path(params)[0]


@pytest.mark.parametrize("layout", ["TP2PP3", "TP4EP2"])
def test_any_source_saves_and_restores_into_layouts(layout, tmp_path_factory):
    """Random weights (no HF checkpoint) saved once restore, into a layout with a padding layer between
    stages (4 layers on 3) or one with repeated kv heads and split experts, exactly as `Model.random`
    places them directly."""
    cfg = moejax.load_model_config("tiny-moe")
    path = tmp_path_factory.getbasetemp() / "tiny-random"
    if not path.exists():
        store.save(path, RandomSource(cfg, seed=5), cfg, origin={"kind": "random", "seed": 5})
    restored = moejax.load(path, layout=layout)
    direct = moejax.Model.random(cfg, seed=5, layout=layout)
    for (p, a), (_, b) in zip(_leaves(restored.params), _leaves(direct.params), strict=True):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b)), p


def test_bfloat16_conversion_matches_hf_rounded_once(hf_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    source = store.OrbaxSource(out)
    assert source.dtype == "bfloat16" and source.read("embed", None, (slice(0, 2), slice(None))).dtype == \
        ml_dtypes.bfloat16
    restored = moejax.load(out, layout="TP2EP2", dtype="bfloat16")
    direct = moejax.load(hf_dir, layout="TP2EP2", dtype="bfloat16")  # rounds float32 -> bfloat16 while placing
    for (path, a), (_, b) in zip(_leaves(restored.params), _leaves(direct.params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


@pytest.mark.parametrize("family", [FAMILY, "deepseek_v3", "gpt_oss"])
def test_slices_read_across_chunks_equal_the_source(family, hf_checkpoints, tmp_path, monkeypatch):
    """With 1 KiB chunks every tensor spans many, and with ~1 KiB read pieces every slice is read in many pieces
    (by both loaders); any slice of any layer reads back exactly: the memory-mapped stored tensor, converted.
    DeepSeek-V3: tensors of the dense layer or of the MoE layers only (stacked over those); gpt-oss: interleaved
    fused experts."""
    hf = HFSource(hf_checkpoints[family][0])
    store.save(tmp_path / "small", hf, hf.cfg, chunk_bytes=1024)
    orbax = store.OrbaxSource(tmp_path / "small")
    monkeypatch.setattr(store, "READ_BYTES", 1000)
    monkeypatch.setattr(hf_module, "READ_BYTES", 1000)
    rng = np.random.default_rng(0)
    for name, (shape, layers) in hf.canonical.items():
        for layer in sorted({layers[0], layers[-1]}) if layers else [None]:
            for _ in range(3):
                index = tuple(slice(int(a), int(b) + 1) for a, b in (sorted(rng.integers(0, n, 2)) for n in shape))
                expected = _mapped(hf, name, layer)[index]
                np.testing.assert_array_equal(hf.read(name, layer, index), expected, err_msg=name)
                np.testing.assert_array_equal(orbax.read(name, layer, index), expected, err_msg=name)


def _mapped(hf, name, layer):
    """Canonical tensor `name` as a view of the memory-mapped file (the reference for the loaders' piecewise reads)."""
    stored, shape = hf.names[name], hf.canonical[name][0]
    if not isinstance(stored.form, Experts):
        return stored.form.to_canonical(hf.tensor(hf.hf_name(name, layer)), shape)
    if "{expert}" in stored.name:
        matrices = [hf.tensor(hf.hf_name(name, layer, e)) for e in range(shape[0])]
    else:
        fused = hf.tensor(hf.hf_name(name, layer))
        part, parts = stored.form.part
        rows = fused.shape[1] // parts
        matrices = [fused[e, part * rows:(part + 1) * rows] for e in range(shape[0])]
    return np.stack([stored.form.form.to_canonical(m, shape[1:]) for m in matrices])


def test_checkpoint_is_plain_orbax_with_its_metadata(converted, hf_dir):
    """Stock orbax restores it (canonical tensors, per-layer ones stacked [L, ...]); moejax metadata rides along."""
    hf = HFSource(hf_dir)
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(converted.absolute())
    assert set(tree) == set(hf.canonical) | {store.FINGERPRINT}
    full = tuple(slice(None) for _ in hf.canonical["moe.wg"][0])
    np.testing.assert_array_equal(tree["moe.wg"], np.stack([hf.read("moe.wg", i, full) for i in range(3)]))
    meta = json.loads((converted / "_METADATA").read_text())["custom_metadata"]["moejax"]
    assert meta["format_version"] == store.FORMAT_VERSION and meta["dtype"] == "float32"
    assert meta["source"] == {"kind": "huggingface", "path": str(hf_dir.absolute()), "files": ["model.safetensors"]}
    assert moejax.ModelConfig.from_dict(meta["config"]) == hf.cfg == store.read_config(converted)


def test_generate_cli_runs_a_converted_checkpoint(converted, capsys):
    assert main(["generate", "--model", str(converted), "--layout", "DP1", "--devices", "8", "--prompt-ids",
                 "1,2,3", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--out", "{converted}"], r"--out .* already exists"),
    (["--out", "{tmp}/no/such/dir/ckpt"], r"parent directory .* does not exist"),
    (["--hf", "{tmp}/missing"], r"--hf .*missing is not a directory"),
    (["--dtype", "int8"], r"argument --dtype: invalid choice"),
])
def test_convert_mistakes_are_one_line(argv, message, converted, hf_dir, tmp_path, capsys):
    args = {"--hf": str(hf_dir), "--out": str(tmp_path / "new")}
    args |= dict(zip(argv[::2], (a.format(converted=converted, tmp=tmp_path) for a in argv[1::2]), strict=True))
    assert main(["convert", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"moejax: error: .*{message}.*\n", err), err
    assert not (tmp_path / "new").exists()


def _with_nan(hf_dir, dst):
    """A copy of the HF checkpoint with one NaN in layer 2's attention output projection."""
    from tests.checkpoint.test_hf_errors import _split, _write

    shutil.copytree(hf_dir, dst)
    header, data = _split(dst / "model.safetensors")
    start = header["model.layers.2.self_attn.o_proj.weight"]["data_offsets"][0]
    data = data[:start] + np.float32(np.nan).tobytes() + data[start + 4:]
    _write(dst / "model.safetensors", header, data)
    return dst


def test_nonfinite_weights_are_refused_by_convert_and_by_load(hf_dir, tmp_path, capsys):
    bad = _with_nan(hf_dir, tmp_path / "nan")
    out = tmp_path / "ckpt"
    assert main(["convert", "--hf", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    # One line: the traceback orbax logs from its writer thread is not shown.
    assert re.fullmatch(r"moejax: error: checkpoint .*nan: tensor model\.layers\.2\.self_attn\.o_proj\.weight "
                        r"\(attn\.wo\) has 1 non-finite value.*\n", err), err
    assert not list(tmp_path.glob("ckpt*"))  # the partial write is removed
    assert main(["convert", "--hf", str(bad), "--out", str(out), "--no-progress", "--allow-nonfinite"]) == 0
    with pytest.raises(CheckpointError, match=r"ckpt: tensor attn\.wo \(layer 2\) has non-finite values"):
        moejax.load(out, layout="TP2")
    assert np.isnan(moejax.load(out, layout="TP2", allow_nonfinite=True).forward(IDS)).any()


def test_mixed_dtype_source_needs_dtype_flag():
    from types import SimpleNamespace

    mixed = SimpleNamespace(path="ck", files={"a": SimpleNamespace(dtype="F32"), "b": SimpleNamespace(dtype="BF16")})
    with pytest.raises(CheckpointError, match=r"ck stores tensors as BF16, F32; choose the stored dtype with --dtype"):
        store.source_dtype(mixed)


# ---- corrupt, truncated or incomplete checkpoints -----------------------------------------------------


def _largest_data_file(ckpt):
    files = [p for p in (ckpt / "ocdbt.process_0" / "d").iterdir()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(ckpt):
    file = _largest_data_file(ckpt)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _zero_bytes(ckpt):
    file = _largest_data_file(ckpt)
    data = bytearray(file.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    file.write_bytes(bytes(data))


def _truncate(ckpt):
    file = _largest_data_file(ckpt)
    os.truncate(file, file.stat().st_size // 2)


def _edit_metadata(edit):
    def corrupt(ckpt):
        data = json.loads((ckpt / "_METADATA").read_text())
        edit(data)
        (ckpt / "_METADATA").write_text(json.dumps(data))

    return corrupt


def _moejax(edit):
    return _edit_metadata(lambda d: edit(d["custom_metadata"]["moejax"]))


def _config(**changes):
    return _moejax(lambda m: m["config"].update(changes))


def _interrupted(ckpt):
    ckpt.rename(ckpt.with_name(ckpt.name + ".orbax-checkpoint-tmp-1234"))


READ = r"checkpoint .*ckpt: tensor [a-z_.]+( \(layer \d\))? cannot be read: "
MISMATCH = r"checkpoint .*ckpt does not match its config \(qwen2_moe, \d layers\): "

CASES = {
    # chunk bytes: every chunk has a crc32c checksum, so no corruption passes as weights
    "data-byte-flipped": (_flip_byte, READ + r".*(Digest mismatch|corruption)"),
    "data-zeroed": (_zero_bytes, READ + r".*(Digest mismatch|corruption)"),
    "data-file-truncated": (_truncate, READ + r".*(OUT_OF_RANGE|DATA_LOSS|not valid)"),
    "data-file-missing": (lambda c: _largest_data_file(c).unlink(), READ + r".*(NOT_FOUND|DATA_LOSS)"),
    # the files orbax writes last, or that list the tensors
    "metadata-missing": (lambda c: (c / "_METADATA").unlink(), r"ckpt is incomplete: .*ckpt/_METADATA is missing"),
    "checkpoint-metadata-missing": (lambda c: (c / "_CHECKPOINT_METADATA").unlink(),
                                    r"ckpt is incomplete: .*ckpt/_CHECKPOINT_METADATA is missing"),
    "metadata-truncated": (lambda c: (c / "_METADATA").write_text((c / "_METADATA").read_text()[:200]),
                           r"orbax metadata .*ckpt/_METADATA is not valid JSON: .*truncated\?"),
    "manifest-missing": (lambda c: (c / "manifest.ocdbt").unlink(),
                         r"ckpt: tensor [a-z_.]+ cannot be opened: .*zarr\.json\" in OCDBT database at local file "
                         r"\".*ckpt/\" does not exist$"),
    "tensor-list-malformed": (_edit_metadata(lambda d: d.update(tree_metadata=["embed"])),
                              r"the tensor list \(tree_metadata\) of .*_METADATA is malformed"),
    "interrupted-conversion": (_interrupted, r"ckpt is incomplete: its conversion did not finish "
                                             r"\(ckpt\.orbax-checkpoint-tmp-1234 is a partial write\)"),
    # moejax metadata vs this code
    "not-moejax": (_edit_metadata(lambda d: d.pop("custom_metadata")), r"an orbax checkpoint but not a moejax one"),
    "format-newer": (_moejax(lambda m: m.update(format_version=3)),
                     r"moejax format version 3; this moejax reads version 2: upgrade moejax"),
    "format-older": (_moejax(lambda m: m.update(format_version=0)), r"format version 0; .*convert it again"),
    "config-unknown-key": (_config(window=3), r"model config does not match this moejax: unknown ModelConfig keys "
                                              r"\['window'\]"),
    "config-missing-key": (_moejax(lambda m: m["config"].pop("hidden_size")),
                           r"model config does not match this moejax: .*hidden_size"),
    "config-planner-only": (_config(family="gpt_moe"), r"model config does not match this moejax: .*planner-only"),
    "stored-dtype-unknown": (_moejax(lambda m: m.update(dtype="int4")), r"stored dtype 'int4' is not one of"),
    # tensors vs config
    "config-more-layers": (_config(num_layers=4), MISMATCH + r".*attn\.wq: expected shape \(4, 48, 8, 16\), "
                                                             r"found \(3, 48, 8, 16\)"),
    "tensor-missing": (_config(o_bias=True), MISMATCH + r"missing tensor attn\.bo \(expected shape \(3, 48\)\)"),
    "tensor-unexpected": (_config(qkv_bias=False),
                          MISMATCH + r"unexpected tensor attn\.bk; unexpected tensor attn\.bq"),
    "tensor-unlisted": (_edit_metadata(lambda d: d["tree_metadata"].pop("('embed',)")),
                        MISMATCH + r"missing tensor embed \(expected shape \(128, 48\)\)"),
    "tensor-misshaped": (_config(vocab_size=130), MISMATCH + r"embed: expected shape \(130, 48\), found \(128, 48\)"),
    "dtype-mismatch": (_moejax(lambda m: m.update(dtype="bfloat16")), MISMATCH + r".*embed: expected dtype bfloat16, "
                                                                               r"found float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_a_clear_error(case, converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted, ckpt)
    corrupt, pattern = CASES[case]
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=pattern) as info:
        moejax.load(ckpt, layout="TP2")
    assert info.value.__cause__ is None
