"""A non-editable install works: the wheel ships the built-in configs, and `moejax generate` runs from it.

Built from a copy of the package sources (the build writes build/ and *.egg-info beside them), installed
into a fresh venv that reuses this interpreter's site-packages for jax and the rest (no download), and run
from a folder outside the repository so nothing resolves to the source tree.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, **kwargs):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_wheel_install_runs_generate_with_a_builtin_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moejax", src / "moejax", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("moejax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moejax/configs/models/tiny-moe.yaml" in names and "moejax/configs/hardware/h100-sxm.yaml" in names
    native = [n for n in names if n.startswith("moejax/native/_kernels") and n.endswith(".so")]
    assert native or shutil.which("c++") is None, "the native kernel was not built into the wheel"

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    python, moejax = venv / "bin" / "python", venv / "bin" / "moejax"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    where = _run(python, "-c", "import moejax.config as c; print(c.__file__)", cwd=run_dir, env=env)
    assert where.startswith(str(venv)), where  # the installed wheel, not the source tree
    result = json.loads(_run(moejax, "generate", "--model", "tiny-moe", "--max-new-tokens", "2", "--json", "--quiet",
                             cwd=run_dir, env=env))
    assert result["model"] == "tiny-moe" and len(result["tokens"]) == 2 and result["devices"] == 8
    if native:  # the installed kernel loads from the wheel
        assert _run(python, "-c", "from moejax import native; print(native.unavailable_reason())", cwd=run_dir,
                    env=env).strip() == "None"
    listed = _run(python, "-c", "from moejax.config import configs_dir; print(sorted(p.name for p in "
                                "configs_dir().glob('*/*.yaml')))", cwd=run_dir, env=env)
    assert "'gpt-moe-1800b.yaml'" in listed and "'h100-sxm.yaml'" in listed
