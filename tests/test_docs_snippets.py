"""Every ```python block of README.md and docs/*.md runs as written: one fresh process per file, blocks in order.

A fresh process with no XLA_FLAGS, as a reader's: the snippets ask for their devices (`moejax.cpu_devices`).
The checkpoint paths the docs use (CHECKPOINTS) hold a tiny random Mixtral with a tokenizer.json here. A block
that cannot run on a CPU test machine (a GPU, a download) starts with the line SKIP followed by its reason.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "# docs-test: skip"
CHECKPOINTS = ("path/to/hf-checkpoint", "ckpt_dir")
MAX_SKIPPED = 3  # skipping is for the few blocks that cannot run here, not a way out


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


WITH_CODE = [p for p in DOCS if python_blocks(p)]


@pytest.fixture(scope="module")
def checkpoint(tokenizer_checkpoint):
    return tokenizer_checkpoint


@pytest.mark.parametrize("doc", WITH_CODE, ids=[p.relative_to(ROOT).as_posix() for p in WITH_CODE])
def test_python_blocks_run_as_written(doc, checkpoint, tmp_path):
    script = "\n".join(b for b in python_blocks(doc) if not b.startswith(SKIP))
    for name in CHECKPOINTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(checkpoint)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{doc.name}:\n{out.stderr[-3000:]}"


def test_the_readme_has_code_and_skipped_blocks_are_few_and_say_why():
    assert python_blocks(ROOT / "README.md")
    skipped = [b.splitlines()[0] for p in DOCS for b in python_blocks(p) if b.startswith(SKIP)]
    assert len(skipped) <= MAX_SKIPPED, skipped
    assert all(len(line) > len(SKIP) + 3 for line in skipped), skipped  # a reason follows the marker
