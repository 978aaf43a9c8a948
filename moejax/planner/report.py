"""Planner outputs: the printed summary, CSV and JSON files and the Pareto plot.

Files written by `write_outputs` into one folder:
- `configs.csv`: every configuration (feasible or not, with the reason), one row each.
- `pareto.csv`: the frontier of tokens/s/device vs tokens/s/user over feasible configurations.
- `pareto.png`: a curve per layout (its own frontier over batch and chunk), the global frontier highlighted
  and labelled, the target tokens/s/user as a line in the legend.
- `plan.json` (when asked): the whole plan (`Plan.to_json`); `compact_json` is what `moejax plan --json` prints.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from moejax.planner.memory import GIB
from moejax.planner.serving import Prediction
from moejax.planner.sweep import Plan, pareto_frontier

FIELDS = list(Prediction.__dataclass_fields__)
LONG_TTFT_S = 2.0  # a ranked row whose first token comes later than this gets a note: the target is decode speed
LISTED = {"rejected": 5, "infeasible": 3}  # examples printed in the summary; the rest are counted


def format_table(rows: list[Prediction], limit: int = 15) -> str:
    """A fixed-width table of predictions; a TTFT over LONG_TTFT_S is marked `!` and explained below."""
    header = (f"{'#':>3} {'layout':<16} {'batch':>6} {'chunk':>6} {'tok/s/dev':>10} {'tok/s/user':>10} "
              f"{'TTFT s':>8} {'TPOT ms':>8} {'GiB/dev':>8} {'bound':<8}")
    lines = [header, "-" * len(header)]
    for i, p in enumerate(rows[:limit], 1):
        mark = "!" if p.ttft_s > LONG_TTFT_S else " "
        lines.append(f"{i:>3} {p.layout:<16} {p.batch_size:>6} {p.chunk_size:>6} {p.tokens_per_s_per_device:>10.1f} "
                     f"{p.tokens_per_s_per_user:>10.1f} {p.ttft_s:>7.3f}{mark} {p.tpot_s * 1e3:>8.2f} "
                     f"{p.mem_per_device_bytes / GIB:>8.1f} {p.bound:<8}")
    if any(p.ttft_s > LONG_TTFT_S for p in rows[:limit]):
        lines.append(f"  ! time to first token over {LONG_TTFT_S:g} s: the ranking's target bounds decode speed "
                     f"(tokens/s/user), not the wait for the first token; weigh TTFT before picking such a row")
    return "\n".join(lines)


def format_summary(result: Plan, limit: int = 15, paths: dict[str, Path] | None = None) -> str:
    """What `moejax plan` prints: rules, counts, the ranking at the target, infeasible examples, file paths."""
    w, c = result.workload, result.count
    hit = f", prefix hit rate {w.prefix_hit_rate:g}" if w.prefix_hit_rate else ""
    out = [f"moejax plan: {result.model} on {result.devices} x {result.hardware}, weights {w.precision}, "
           f"KV {w.kv_precision}, isl {w.isl}, osl {w.osl}{hit}, expert mode '{result.options.expert_mode}'",
           "", "Rules:"]
    out += [f"  - {r}" for r in result.rules]
    out += ["", f"Layouts of {result.devices} devices: {c['layouts_total']}, {c['layouts_valid']} valid, "
                f"{len(result.rejected)} rejected by the rules",
            f"Configurations (layout x batch x chunk): {c['configs']}, {c['configs_feasible']} fit in memory, "
            f"{c['configs_infeasible']} do not"]
    for layout, reasons in result.rejected[:LISTED["rejected"]]:
        out.append(f"  rejected {layout}: {reasons[0]}")
    out += _more(len(result.rejected), LISTED["rejected"], "rejected layouts")
    infeasible = [p for p in result.predictions if not p.feasible]
    for p in infeasible[:LISTED["infeasible"]]:
        out.append(f"  infeasible {p.layout} batch {p.batch_size} chunk {p.chunk_size}: {p.reason}")
    out += _more(len(infeasible), LISTED["infeasible"], "infeasible configurations (every one is in configs.csv)")
    out += ["", f"Best configuration per layout at >= {result.target_tps_user:g} tokens/s/user "
                f"({len(result.ranking)} layouts qualify):"]
    out.append(format_table(result.ranking, limit) if result.ranking else "  (none: lower --target-tps-user)")
    out += ["", f"Pareto frontier: {len(result.pareto)} configurations"]
    if paths:
        out += [""] + [f"{name}: {path}" for name, path in paths.items()]
    out.append(f"planned in {result.seconds:.2f} s")
    return "\n".join(out)


def _more(count: int, shown: int, what: str) -> list[str]:
    return [f"  ... and {count - shown} more {what}"] if count > shown else []


def compact_json(result: Plan, paths: dict[str, Path], top: int = 15) -> dict:
    """What `moejax plan --json` prints: the run, its counts, the ranking's top rows, the frontier, the files.

    Every configuration is in the files (`plan.json` holds `Plan.to_json`, `configs.csv` the same rows), so
    the printed object stays small enough to read or pipe (the 64-GPU study's full dump is megabytes).
    """
    full = result.to_json()
    summary = {k: full[k] for k in ("model", "hardware", "devices", "workload", "options", "target_tps_user",
                                    "rules", "count")}
    summary["rejected_layouts"] = len(result.rejected)
    return {"summary": summary, "ranking": full["ranking"][:top], "pareto": full["pareto"],
            "files": {k: str(v) for k, v in paths.items()}}


def write_json(result: Plan, path: Path) -> Path:
    """Write the whole plan (`Plan.to_json`) as one JSON object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json()))
    return path


def write_csv(rows: list[Prediction], path: Path) -> Path:
    """Write predictions as CSV with one column per `Prediction` field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for p in rows:
            writer.writerow(p.as_dict())
    return path


def plot_pareto(result: Plan, path: Path, max_layouts: int = 12) -> Path:
    """Plot each layout's own frontier (the best `max_layouts` by peak throughput) and the global frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(result, max_layouts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_MARKERS = "os^vD<>pPXh*"


def pareto_figure(result: Plan, max_layouts: int = 12):
    """The Pareto figure: a (colour, marker) pair per layout, distinct for 60 layouts (matplotlib's default cycle
    repeats after 10), every frontier point labelled layout / batch / chunk, the target a line in the legend."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_layout: dict[str, list[Prediction]] = {}
    for p in result.predictions:
        by_layout.setdefault(p.layout, []).append(p)
    curves = {name: pareto_frontier(ps) for name, ps in by_layout.items()}
    curves = {k: v for k, v in curves.items() if v}
    best = sorted(curves, key=lambda k: -max(p.tokens_per_s_per_device for p in curves[k]))[:max_layouts]
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for i, name in enumerate(best):
        pts = curves[name]
        ax.plot([p.tokens_per_s_per_user for p in pts], [p.tokens_per_s_per_device for p in pts],
                color=colours[i % len(colours)], marker=_MARKERS[i % len(_MARKERS)], ms=4,
                lw=1, alpha=0.8, label=name)
    front = result.pareto
    ax.plot([p.tokens_per_s_per_user for p in front], [p.tokens_per_s_per_device for p in front],
            color="black", lw=2.5, marker="o", ms=4, label="Pareto frontier", zorder=5)
    if result.target_tps_user:
        ax.axvline(result.target_tps_user, color="grey", ls="--", lw=1,
                   label=f"target {result.target_tps_user:g} tokens/s/user")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2 x 10^1
    some = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else "")  # minor ticks
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(some)
    ax.yaxis.set_major_formatter(plain)
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel("tokens/s per device (throughput)")
    w = result.workload
    ax.set_title(f"{result.model} on {result.devices} x {result.hardware} ({w.precision}, isl {w.isl}, osl {w.osl})")
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=7, ncol=2)
    from moejax.bench.plots import place_labels  # labels never overlap: one that finds no free place is left out

    # Labels avoid each other and the legend (inside the axes).
    _, left_out = place_labels(ax, [(x, y, label) for (x, y), label in _frontier_labels(front).items()],
                               [legend.get_window_extent(fig.canvas.get_renderer())], fontsize=6, zorder=6)
    if left_out:
        ax.set_xlabel(f"{ax.get_xlabel()}\n({left_out} frontier label{'s' * (left_out > 1)} left out where "
                      f"{'they' if left_out > 1 else 'it'} would overlap another)")
    return fig


def _frontier_labels(front: list[Prediction]) -> dict[tuple[float, float], str]:
    """One label per (layout, batch) of the frontier, at its first point: chunk sizes of one layout and batch sit
    next to each other there, so they share it (`TP4EP16 b64 c1024/512/256`) rather than print over each other."""
    groups: dict[tuple[str, int], list[Prediction]] = {}
    for p in front:
        groups.setdefault((p.layout, p.batch_size), []).append(p)
    return {(ps[0].tokens_per_s_per_user, ps[0].tokens_per_s_per_device):
            f"{layout} b{batch} c{'/'.join(str(p.chunk_size) for p in ps)}" for (layout, batch), ps in groups.items()}


def write_outputs(result: Plan, out_dir: Path | str, plot: bool = True, full_json: bool = False) -> dict[str, Path]:
    """Write configs.csv, pareto.csv, (if `plot`) pareto.png and (if `full_json`) plan.json into `out_dir`;
    return their paths."""
    out_dir = Path(out_dir)
    paths = {"configs_csv": write_csv(result.predictions, out_dir / "configs.csv"),
             "pareto_csv": write_csv(result.pareto, out_dir / "pareto.csv")}
    if full_json:
        paths["plan_json"] = write_json(result, out_dir / "plan.json")
    if plot:
        paths["pareto_png"] = plot_pareto(result, out_dir / "pareto.png")
    return paths
