"""`moejax convert` end to end: the tokenizer files travel with the weights, the metadata is bound to the data
(fingerprint), and Ctrl-C (a real SIGINT to a real process) leaves no partial output and no traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import moejax
from moejax.checkpoint import store
from moejax.checkpoint.hf import CheckpointError
from moejax.cli import main
from tests import hf_models

ROOT = Path(__file__).parent.parent.parent
TEXT_FILES = {"tokenizer_config.json": '{"model_max_length": 1024}', "special_tokens_map.json": '{"bos_token": "<s>"}',
              "generation_config.json": '{"do_sample": false}', "chat_template.jinja": "{{ messages }}"}


def interrupted_run(argv: list[str], marker: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run `python argv` with unbuffered output, send SIGINT once `marker` appears on its stderr or stdout (work
    is then in progress), and return its exit status and whole output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail(f"{marker!r} never appeared: {''.join(seen)}")
        rest, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(seen) + rest)


@pytest.fixture(scope="module")
def hf_dir(hf_checkpoints, tmp_path_factory):
    """The tiny Mixtral checkpoint with a tokenizer.json and the other text-side files a HF checkpoint carries."""
    path = tmp_path_factory.mktemp("convert") / "hf"
    shutil.copytree(hf_checkpoints["mixtral"][0], path)
    hf_models.save_tokenizer(path)
    for name, text in TEXT_FILES.items():
        (path / name).write_text(text)
    return path


def test_convert_copies_tokenizer_files_and_load_has_the_tokenizer(hf_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    assert "with tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json, " \
           "chat_template.jinja" in capsys.readouterr().out
    for name in ["tokenizer.json", *TEXT_FILES]:
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert not (out / "config.json").exists()  # still read as a moejax checkpoint, not a HF one
    model = moejax.load(out, layout="DP1")
    text = "the quick brown fox"
    assert model.tokenizer is not None
    assert model.tokenizer.encode(text).ids == moejax.load(hf_dir, layout="DP1").tokenizer.encode(text).ids


def test_convert_refuses_an_unreadable_tokenizer_before_writing(hf_dir, tmp_path, capsys):
    bad = tmp_path / "hf"
    shutil.copytree(hf_dir, bad)
    (bad / "tokenizer.json").write_text("{")
    assert main(["convert", "--hf", str(bad), "--out", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.startswith(f"moejax: error: {bad}/tokenizer.json: not a readable tokenizer file")
    assert not list(tmp_path.glob("ckpt*"))


# ---- the fingerprint ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two converted checkpoints of different models with the same tensor shapes (rope_theta, norm eps differ)."""
    root = tmp_path_factory.mktemp("twins")
    out = []
    for name, seed, extra in (("a", 0, {}), ("b", 1, {"rope_theta": 500000.0, "rms_norm_eps": 1e-5})):
        hf_models.build("mixtral", root / f"hf_{name}", seed=seed, **extra)
        assert main(["convert", "--hf", str(root / f"hf_{name}"), "--out", str(root / name), "--no-progress"]) == 0
        out.append(root / name)
    return out


def test_metadata_of_another_model_with_the_same_shapes_is_refused(twins, tmp_path):
    a, b = twins
    cfg_a, cfg_b = store.read_config(a), store.read_config(b)
    assert cfg_a != cfg_b and moejax.weights.canonical_shapes(cfg_a) == moejax.weights.canonical_shapes(cfg_b)
    store.OrbaxSource(b)  # the control: b with its own metadata opens
    swapped = tmp_path / "b_with_a_metadata"
    shutil.copytree(b, swapped)
    shutil.copy2(a / "_METADATA", swapped / "_METADATA")
    with pytest.raises(CheckpointError, match=r"b_with_a_metadata: its metadata \(.*_METADATA: model hf_a, mixtral\) "
                                              r"was not written with its tensors .* copied from another checkpoint or "
                                              r"edited; restore the checkpoint's own _METADATA, or convert"):
        moejax.load(swapped, layout="DP1")


def test_the_same_config_in_another_checkpoint_is_refused_too(twins, tmp_path):
    """Even the metadata of a conversion of the same model does not pass: each conversion has its own id."""
    a, _ = twins
    again = tmp_path / "again"
    assert main(["convert", "--hf", str(a.parent / "hf_a"), "--out", str(again), "--no-progress"]) == 0
    assert store.read_config(again) == store.read_config(a)
    shutil.copy2(a / "_METADATA", again / "_METADATA")
    with pytest.raises(CheckpointError, match=r"was not written with its tensors"):
        store.OrbaxSource(again)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["config"].update(rope_theta=1.0), r"was not written with its tensors"),
    (lambda m: m.update(checkpoint_id="0" * 32), r"was not written with its tensors"),
    (lambda m: m.pop("checkpoint_id"), r"was not written with its tensors"),
])
def test_edited_metadata_with_unchanged_shapes_is_refused(edit, message, twins, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(twins[0], ckpt)
    data = json.loads((ckpt / "_METADATA").read_text())
    edit(data["custom_metadata"]["moejax"])
    (ckpt / "_METADATA").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        store.OrbaxSource(ckpt)


def test_a_checkpoint_without_its_fingerprint_is_refused(twins, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(twins[0], ckpt)
    data = json.loads((ckpt / "_METADATA").read_text())
    data["tree_metadata"].pop(f"('{store.FINGERPRINT}',)")
    (ckpt / "_METADATA").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"no moejax.fingerprint tensor, so its metadata cannot be checked"):
        store.OrbaxSource(ckpt)


# ---- Ctrl-C ----------------------------------------------------------------------------------------

# The conversion, slowed down from its fifth tensor read on, says when it is under way (then SIGINT comes).
SLOW_CONVERT = """
import sys, time
from moejax.checkpoint import hf
read, calls = hf.HFSource.read, []
def slow_read(self, *args):
    calls.append(1)
    if len(calls) == 5:
        print("conversion under way", file=sys.stderr, flush=True)
    if len(calls) >= 5:
        time.sleep(0.2)
    return read(self, *args)
hf.HFSource.read = slow_read
from moejax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_convert_leaves_nothing_and_a_later_convert_works(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    run = interrupted_run(["-c", SLOW_CONVERT, "convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"],
                          "conversion under way")
    assert run.returncode == 130, run.stdout
    assert "Traceback" not in run.stdout and run.stdout.splitlines()[-1] == "moejax: interrupted", run.stdout
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no staging directory
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    assert moejax.load(out, layout="DP1").tokenizer is not None


def test_a_killed_conversions_staging_directory_is_replaced(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    stale = tmp_path / "ckpt.moejax-tmp"
    (stale / "ocdbt.process_0").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"ckpt is incomplete: its conversion did not finish \(ckpt.moejax-tmp "
                                              r"is a partial write\)"):
        moejax.load(out, layout="DP1")
    assert main(["convert", "--hf", str(hf_dir), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    store.OrbaxSource(out)
