"""notebooks/planner.ipynb runs top to bottom (the 64-GPU study of the 1.8T model)."""

from tests.notebooks import execute


def test_planner_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_PLAN_OUT", str(tmp_path))
    _, text = execute("planner.ipynb", timeout=60)
    assert "1.78T parameters" in text
    assert "Best configuration per layout at >= 20 tokens/s/user" in text
    assert (tmp_path / "gb200" / "pareto.png").exists() and (tmp_path / "h100" / "pareto.csv").exists()
