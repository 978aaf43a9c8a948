"""`dtype="auto"`, the default of `moejax.load`, `Model` / `Model.random`, `generate`, `sweep` and `bench *`: the
checkpoint's own dtype (config.json torch_dtype / dtype; a moejax checkpoint's stored dtype; a config's `dtype`),
resolved once on the host to a concrete name, which results record; explicit names override it."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

import moejax
from moejax import cli
from moejax.bench import sweep
from moejax.config import ModelConfig, load_model_config, resolve_dtype
from moejax.mesh import Layout
from tests import hf_models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """dtype -> a tiny random Mixtral checkpoint saved in it (config.json dtype and tensors alike)."""
    import torch

    root = tmp_path_factory.mktemp("dtype")
    model = hf_models.build("mixtral", root / "float32")
    model.to(torch.bfloat16).save_pretrained(root / "bfloat16", safe_serialization=True)
    return {"float32": root / "float32", "bfloat16": root / "bfloat16"}


def _param_dtypes(model) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(model.params) if jnp.issubdtype(leaf.dtype, jnp.floating)}


# ---- the config: what auto means -----------------------------------------------------------------------------


@pytest.mark.parametrize("declared, serving", [
    ({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
    ({"torch_dtype": "float32"}, "float32"),
    ({}, "float32"),  # none declared: transformers' own default
    ({"torch_dtype": "torch.bfloat16"}, "bfloat16"), ({"torch_dtype": "float64"}, "float32"),
    ({"torch_dtype": "float8_e4m3fn"}, "bfloat16"),  # an FP8 checkpoint's storage: computed in bfloat16
])
def test_auto_is_the_config_json_dtype(declared, serving):
    hf = {k: v for k, v in hf_models.hf_config("mixtral").to_dict().items() if k not in ("dtype", "torch_dtype")}
    cfg = ModelConfig.from_hf({**hf, **declared, "model_type": "mixtral"})
    assert resolve_dtype("auto", cfg) == cfg.serving_dtype == serving
    assert resolve_dtype("float16", cfg) == "float16"  # a name given wins


def test_an_unservable_dtype_asks_for_one_and_a_bad_name_is_refused():
    cfg = load_model_config("tiny-moe").replace(dtype="complex64")
    with pytest.raises(ValueError, match=r"declares dtype 'complex64'.*pass a dtype explicitly \(--dtype / dtype=\)"):
        resolve_dtype("auto", cfg)
    assert resolve_dtype("bfloat16", cfg) == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype must be 'auto' .* or one of float32, bfloat16, float16, got 'fp64'"):
        resolve_dtype("fp64", cfg)


def test_model_random_of_a_builtin_config_serves_in_its_dtype():
    cfg = load_model_config("tiny-moe")
    assert cfg.dtype == "float32"  # the built-in configs declare none
    model = moejax.Model.random(cfg, layout="DP1")
    assert model.dtype_name == "float32" and model.dtype == jnp.float32
    bf16 = moejax.Model.random(cfg.replace(dtype="bfloat16"), layout="DP1")
    assert bf16.dtype_name == "bfloat16" and _param_dtypes(bf16) >= {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="dtype must be 'auto'"):
        moejax.Model.random(cfg, layout="DP1", dtype="float64")


# ---- moejax.load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
def test_load_serves_in_the_checkpoints_dtype_unless_told(checkpoints, saved):
    model = moejax.load(checkpoints[saved], layout="DP1")
    assert model.cfg.dtype == model.dtype_name == saved and model.dtype == jnp.dtype(saved)
    assert jnp.dtype(saved) in _param_dtypes(model)
    other = "float32" if saved == "bfloat16" else "bfloat16"
    explicit = moejax.load(checkpoints[saved], layout="DP1", dtype=other)
    assert explicit.dtype_name == other and jnp.dtype(saved) not in _param_dtypes(explicit)


def test_a_moejax_checkpoint_serves_in_its_stored_dtype(checkpoints, tmp_path):
    from moejax.checkpoint import store
    from moejax.checkpoint.hf import HFSource

    source = HFSource(checkpoints["float32"])
    out = tmp_path / "ckpt"
    store.save(out, source, source.cfg, dtype="bfloat16")
    assert store.read_config(out).dtype == "bfloat16"  # what the CLI reads before JAX starts
    assert "dtype" not in store._config_fields(source.cfg)  # stored as before: old fingerprints still match
    assert moejax.load(out, layout="DP1").dtype_name == "bfloat16"


# ---- moejax generate -----------------------------------------------------------------------------------------


@pytest.fixture
def built(monkeypatch):
    """The dtype `generate` builds its model with; the build itself is refused (no model work)."""
    seen = []

    def capture(self, cfg, source, layout="DP1", dtype="auto", **kwargs):
        seen.append(dtype)
        raise RuntimeError("model build reached")

    monkeypatch.setattr(moejax.Model, "__init__", capture)
    return seen


@pytest.mark.parametrize("saved, flag, expected", [
    ("bfloat16", [], "bfloat16"), ("float32", [], "float32"), ("bfloat16", ["--dtype", "float32"], "float32"),
    ("float32", ["--dtype", "float16"], "float16")])
def test_generate_resolves_the_dtype_before_the_build(checkpoints, built, saved, flag, expected):
    with pytest.raises(RuntimeError, match="model build reached"):
        cli.main(["generate", "--model", str(checkpoints[saved]), "--layout", "DP1", "--quiet", *flag])
    assert built == [expected]  # the concrete name, never "auto"


def test_generate_prints_the_resolved_dtype(checkpoints, capsys):
    assert cli.main(["generate", "--model", str(checkpoints["bfloat16"]), "--layout", "DP1", "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "2", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and len(result["tokens"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["generate", "--dtype", "fp64"], r"argument --dtype: invalid choice: 'fp64' \(choose from 'auto', "
                                      r"'float32', 'bfloat16', 'float16'\)"),
    (["bench", "serve", "--dtype", "half"], r"argument --dtype: invalid choice: 'half'"),
    (["generate", "--model", "{weird}"], r"--dtype auto: model .* declares dtype 'complex64' .*pass a dtype "
                                         r"explicitly"),
])
def test_a_bad_dtype_is_one_line(argv, message, checkpoints, built, tmp_path, capsys):
    weird = tmp_path / "weird"
    weird.mkdir()
    hf = json.loads((checkpoints["float32"] / "config.json").read_text())
    (weird / "config.json").write_text(json.dumps({**hf, "dtype": "complex64"}))
    rc = cli.main([a.replace("{weird}", str(weird)) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moejax: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert built == []


# ---- the benchmarks: rows record the resolved dtype ----------------------------------------------------------


def test_sweep_spec_resolves_auto_for_its_rows(checkpoints):
    spec = sweep.SweepSpec(model=str(checkpoints["bfloat16"]), layouts=(Layout.parse("DP1"),))
    assert spec.dtype == "bfloat16" and {c["dtype"] for c in spec.configs()} == {"bfloat16"}
    assert sweep.SweepSpec(model="tiny-moe", layouts=(Layout.parse("DP1"),)).dtype == "float32"
    assert sweep.SweepSpec(model="tiny-moe", layouts=(Layout.parse("DP1"),), dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("command", ["sweep", "serve"])
def test_sweep_and_serve_run_in_the_resolved_dtype(command, checkpoints, monkeypatch, tmp_path):
    seen = []

    def refuse(spec, *args, **kwargs):
        seen.append(spec.dtype)
        raise RuntimeError("model build reached")

    monkeypatch.setattr(sweep, "_build_model", refuse)
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, *a, **k: refuse(spec))
    argv = (["sweep", "--layouts", "DP1", "--out", str(tmp_path / "out")] if command == "sweep"
            else ["bench", "serve", "--layout", "DP1", "--max-running", "2"])
    with pytest.raises(RuntimeError, match="model build reached"):
        cli.main([*argv, "--model", str(checkpoints["bfloat16"]), "--devices", "1", "--input-len", "4",
                  "--output-len", "2", "--num-requests", "2"])
    assert seen == ["bfloat16"]


def test_decode_rows_record_the_dtype_of_every_system(tmp_path):
    from moejax.bench import decode

    m = {"ttft_s": 0.1, "tpot_s": 0.01, "tokens": [[1]], **{k: 0.0 for k in decode._HOST_FIELDS}}
    vllm = {**m, "preload": "", "threads_bind": "0"}
    out = tmp_path / "rows.jsonl"
    decode._write_jsonl(str(out), [{"batch": 1, "dtype": "bfloat16", "ours": m, "hf": None, "vllm": vllm}],
                        SimpleNamespace(name="bench-moe-100m"), SimpleNamespace(isl=4, osl=4), "cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["system"], r["dtype"], r["precision"], r["kv_precision"]) for r in rows} == {
        ("moejax", "bfloat16", "bfloat16", "bfloat16"), ("vllm-cpu", "bfloat16", "bfloat16", "bfloat16")}


def test_bench_decode_refuses_a_bad_dtype_before_any_work(capsys):
    from moejax.args import run_main
    from moejax.bench import decode

    assert run_main(decode.main, ["--dtype", "float64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --dtype: invalid choice: 'float64'" in err[0]


def test_vllm_worker_gets_the_resolved_dtype(tmp_path, monkeypatch):
    """A fake worker python records its argv: vLLM runs in the dtype moejax resolved, and each run says so."""
    from moejax.bench.vs_vllm import VLLM

    seen = tmp_path / "argv.json"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        open({str(seen)!r}, "w").write(json.dumps(sys.argv[1:]))
        print(json.dumps({{"ready": True, "libs": {{}}}}), flush=True)
        for line in sys.stdin:
            n = json.loads(line)["max_tokens"]
            print(json.dumps({{"tokens": [[7] * n], "wall_s": 0.5, "ttft_s": [0.1], "tpot_s": [0.01]}}), flush=True)
        """))
    python.chmod(0o755)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    vllm = VLLM(str(python), tmp_path, 4, 96, dtype="bfloat16")
    try:
        out = vllm.run([[1, 2]], 3)
    finally:
        vllm.close()
    argv = json.loads(seen.read_text())
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and out["dtype"] == "bfloat16"


def test_vs_vllm_resolves_auto_before_starting_anything(monkeypatch, tmp_path, capsys):
    from moejax.bench import vs_vllm

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)

    def refuse(cfg, path):
        raise RuntimeError("work reached")

    monkeypatch.setattr(vs_vllm, "build_checkpoint", refuse)
    with pytest.raises(RuntimeError, match="work reached"):
        vs_vllm.main(["--vllm-python", str(python), "--model", "bench-moe-100m", "--batch-sizes", "1"])
    assert "dtype: float32" in capsys.readouterr().out  # the built-in config's own
    with pytest.raises(SystemExit) as e:
        vs_vllm.main(["--vllm-python", str(python), "--dtype", "float64"])
    assert e.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
