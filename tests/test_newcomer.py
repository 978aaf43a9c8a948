"""What a first run meets: the README's text example, progress while compiling, log lines, notebooks, plots."""

import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a reader's shell: moejax asks for devices


def test_the_readme_text_example_runs_as_written(tmp_path):
    """The README's `moejax demo-checkpoint ... && moejax generate --prompt ...` line, run by bash (its folder
    moved into tmp_path): text streams out, and a second run of the same line works too."""
    if shutil.which("moejax") is None:
        pytest.skip("the moejax command is not installed (pip install -e .)")
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    line = next(line for block in blocks for line in block.splitlines() if "moejax demo-checkpoint" in line)
    prompt = re.search(r'--prompt "([^"]+)"', line).group(1)
    command = line.replace("/tmp/demo", str(tmp_path / "demo"))
    for _ in range(2):
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=_env(), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        streamed = [x for x in out.stdout.splitlines() if x.startswith(f"  prompt {prompt!r} -> ")]
        assert len(streamed) == 1 and streamed[0].endswith(" (length)"), out.stdout
        assert len(streamed[0]) > len(f"  prompt {prompt!r} ->  (length)")  # some text came out


def test_bench_serve_shows_its_compile_and_log_lines_never_wrap(tmp_path):
    """`bench serve` into a pipe (a log): a line per phase and per program compiled, before the result table,
    each whole on one line however long (rich would wrap them at 80 columns)."""
    out = subprocess.run([sys.executable, "-m", "moejax", "bench", "serve", "--layout", "DP2", "--num-requests", "2",
                          "--input-len", "4", "--output-len", "2", "--max-running", "2", "--chunk-size", "8",
                          "--model", "tiny-moe"], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("moejax: ")]
    phases = ["placing tiny-moe on layout DP2", "compiling the steps: prefill (1 x 8 tokens), decode (batch 1), and "
              "reading their collectives", "serving 2 warm-up and 2 measured requests"]
    for phase in phases:
        assert f"moejax: {phase} ..." in lines
        assert any(x.startswith(f"moejax: {phase}: done in ") for x in lines)
    compiled = [x for x in lines if re.fullmatch(r"moejax:   XLA compiled program \d+ in \d+\.\d s", x)]
    assert compiled and max(map(len, lines)) > 100  # long lines came out whole
    assert "Serving Benchmark Result" in out.stdout and "moejax:" not in out.stdout


def test_sweep_log_lines_never_wrap(tmp_path):
    """`moejax sweep` with stderr in a pipe: a line when a configuration starts, its phases, and its result line
    (longer than 80 columns) whole."""
    out = subprocess.run([sys.executable, "-m", "moejax", "sweep", "--layouts", "DP1", "--num-requests", "2",
                          "--input-len", "4", "--output-len", "2", "--max-running", "2", "--chunk-sizes", "8",
                          "--no-plot", "--out", str(tmp_path / "sweep")], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    start = lines.index("start DP1 chunk 8 max_running 2 (1 of 1)")
    done = [i for i, x in enumerate(lines) if x.startswith("done  DP1 chunk 8 max_running 2: ")]
    assert len(done) == 1 and done[0] > start and len(lines[done[0]]) > 80
    assert re.search(r", compile \d+\.\d s$", lines[done[0]])  # the end of the line is on the line
    assert any("XLA compiled program 1 in" in x for x in lines[start:done[0]])
    assert "\x1b" not in out.stderr


def test_progress_lines_into_a_pipe_are_not_wrapped():
    """The default consoles (stderr, not a terminal: rich assumes 80 columns) print a 300-character line whole."""
    code = ("from moejax.progress import Progress\nfrom moejax.bench.sweep import _Progress\n"
            "Progress().note('a' * 300)\nwith _Progress(1, True) as bar:\n    bar.log('b' * 300)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["moejax:   " + "a" * 300, "b" * 300]


def test_notebooks_are_committed_with_their_outputs():
    """Every code cell ran, in order, and the notebook shows what it printed and drew (the tests re-run them)."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), path.name
        outputs = [o for c in cells for o in c["outputs"]]
        assert all(c["outputs"] for c in cells), f"{path.name}: a code cell has no output"
        assert not [o for o in outputs if o["output_type"] == "error"], path.name


def test_plan_help_names_the_runtime_default_expert_mode(capsys):
    from moejax import cli
    from moejax.axes import EXPERT_MODES
    from moejax.inference import Model

    default = inspect.signature(Model.__init__).parameters["expert_mode"].default
    other = next(m for m in EXPERT_MODES if m != default)
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text[text.index("--expert-mode"):]
    assert help_text.index(f"{default} (") < help_text.index("the runtime's default") < help_text.index(f"{other} (")


# ---- pareto labels -------------------------------------------------------------------------------


def _rows(n: int, spread: float) -> list[dict]:
    """n layouts on the frontier (tokens/s/user rising as tokens/s/device falls), and one far below it that
    sets the axes' range (a sweep's slow layouts do that)."""
    points = [(10.0 * (1 + spread) ** i, 100.0 / (1 + spread) ** i) for i in range(n)] + [(0.01, 0.01)]
    return [{"layout": f"DP{i + 1}TP2EP2", "expert_mode": "dp_attention", "tokens_per_s_per_user": x,
             "tokens_per_s_per_device": y, "model": "tiny-moe", "devices": 8, "platform": "cpu", "isl": 16, "osl": 8}
            for i, (x, y) in enumerate(points)]


def _drawn_labels(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.axes[0].texts]


@pytest.mark.parametrize("n, spread", [(40, 0.01), (12, 0.5)])
def test_frontier_labels_never_overlap(n, spread):
    """Crowded (40 frontier points within 50% of each other): the labels drawn do not overlap, the rest are
    counted on the axis; spread out: every point is labelled."""
    import matplotlib.pyplot as plt

    from moejax.bench import plots

    fig = plots.tradeoff_figure(_rows(n, spread))
    labels = _drawn_labels(fig)
    frame = fig.axes[0].get_window_extent(fig.canvas.get_renderer())
    for (a, box_a), (b, box_b) in itertools.combinations(labels, 2):
        assert not box_a.overlaps(box_b), (a, b)
    assert all(frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
               for _, box in labels)
    left_out = n - len(labels)
    xlabel = fig.axes[0].get_xlabel()
    plt.close(fig)
    if spread == 0.5:
        assert left_out == 0 and "left out" not in xlabel
    else:
        assert 0 < left_out < n and f"({left_out} frontier labels left out" in xlabel
