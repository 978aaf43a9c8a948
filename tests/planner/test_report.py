"""The planner's printed summary and Pareto figure: notes, counts, colours, labels and legend."""

import dataclasses

import pytest

from moejax.config import load_model_config
from moejax.planner.hardware import load_hardware
from moejax.planner.report import LONG_TTFT_S, format_summary, format_table, pareto_figure
from moejax.planner.serving import Prediction
from moejax.planner.sweep import plan
from moejax.planner.workload import Workload


@pytest.fixture(scope="module")
def study():
    """The 64-GPU study of the 1.8T model: more than 10 layouts on the plot, hundreds of infeasible configs."""
    cfg, hw = load_model_config("gpt-moe-1800b"), load_hardware("gb200-nvl72")
    return plan(cfg, hw, 64, Workload(isl=1024, osl=256, precision="fp4"), target_tps_user=20)


def _row(**kw) -> Prediction:
    base = dict(layout="TP8", chunk_size=256, batch_size=8, feasible=True, reason="", mem_per_device_bytes=2**30,
                ttft_s=0.2, tpot_s=0.02, tokens_per_s_per_device=100.0, tokens_per_s_per_user=50.0, microbatches=1,
                bubble=0.0, t_compute_s=0.0, t_memory_s=0.0, t_comm_s=0.0, bound="memory")
    fields = {f.name for f in dataclasses.fields(Prediction)}
    return Prediction(**{k: v for k, v in {**base, **kw}.items() if k in fields})


def test_a_long_ttft_row_is_marked_and_explained():
    slow = _row(layout="DP8TP8", ttft_s=LONG_TTFT_S * 5)
    table = format_table([_row(), slow])
    marked = [line for line in table.splitlines() if "DP8TP8" in line]
    assert marked and f"{LONG_TTFT_S * 5:.3f}!" in marked[0]
    assert f"! time to first token over {LONG_TTFT_S:g} s" in table.splitlines()[-1]
    assert "!" not in format_table([_row()])


def test_summary_counts_what_it_does_not_list(study):
    text = format_summary(study)
    infeasible = study.count["configs_infeasible"]
    assert f"Layouts of 64 devices: {study.count['layouts_total']}, " in text
    assert text.count("  infeasible ") == min(3, infeasible)
    if infeasible > 3:
        assert f"  ... and {infeasible - 3} more infeasible configurations" in text
    if len(study.rejected) <= 5:
        assert "more rejected layouts" not in text


def test_pareto_figure_tells_layouts_apart_labels_the_frontier_and_names_the_target(study):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(study, max_layouts=12)
    ax = fig.axes[0]
    layouts = [line for line in ax.get_lines() if line.get_label() not in ("Pareto frontier",)
               and not line.get_label().startswith("target")]
    assert len(layouts) == 12
    styles = {(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in layouts}
    assert len(styles) == 12  # no colour + marker repeats past matplotlib's 10-colour cycle
    labels = [t.get_text() for t in ax.texts]
    labelled = [p for p in study.pareto
                if any(t.startswith(f"{p.layout} b{p.batch_size} c") and str(p.chunk_size) in t for t in labels)]
    left_out = len(study.pareto) - len(labelled)
    assert len(labelled) >= len(study.pareto) // 2
    assert (f"({left_out} frontier label" in ax.get_xlabel()) == (left_out > 0)  # what is not drawn is counted
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts] + [ax.get_legend().get_window_extent(renderer)]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])  # labels never overlap
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "target 20 tokens/s/user" in legend and "Pareto frontier" in legend
    plt.close(fig)
