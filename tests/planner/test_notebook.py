"""notebooks/planner.ipynb runs top to bottom (the 64-GPU study of the 1.8T model)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def test_planner_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_PLAN_OUT", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "planner.ipynb", as_version=4)
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "1.78T parameters" in text
    assert "Best configuration per layout at >= 20 tokens/s/user" in text
    assert (tmp_path / "gb200" / "pareto.png").exists() and (tmp_path / "h100" / "pareto.csv").exists()
