"""notebooks/layout_sweep.ipynb runs top to bottom (8 simulated CPU devices, tiny-moe, DP1, DP8, TP2EP2PP2)."""

from moejax.planner.calibrate import read_measurements
from tests.notebooks import execute


def test_layout_sweep_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_SWEEP_OUT", str(tmp_path))
    nb, text = execute("layout_sweep.ipynb", timeout=300)
    assert "8 cpu devices" in text
    assert "greedy tokens: 5 of 5 configurations equal the reference run's" in text
    assert "| layout | expert mode | phase |" in text and "fitted {" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get(
        "data", {})]
    assert len(images) == 2
    assert len(read_measurements(tmp_path / "results.jsonl")) == 5
    assert (tmp_path / "tradeoff.png").exists() and (tmp_path / "latency_vs_chunk.png").exists()
