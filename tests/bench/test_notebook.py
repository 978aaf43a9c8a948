"""notebooks/layout_sweep.ipynb runs top to bottom (8 simulated CPU devices, tiny-moe, DP1, DP8, TP2EP2PP2)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from moejax.planner.calibrate import read_measurements

ROOT = Path(__file__).resolve().parents[2]


def test_layout_sweep_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_SWEEP_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "layout_sweep.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "8 cpu devices" in text
    assert "greedy tokens: 5 of 5 configurations equal the reference run's" in text
    assert "| layout | expert mode | phase |" in text and "fitted {" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get(
        "data", {})]
    assert len(images) == 2
    assert len(read_measurements(tmp_path / "results.jsonl")) == 5
    assert (tmp_path / "tradeoff.png").exists() and (tmp_path / "latency_vs_chunk.png").exists()
