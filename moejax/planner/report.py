"""Planner outputs: the printed summary, CSV files and the Pareto plot.

Files written by `write_outputs` into one folder:
- `configs.csv`: every configuration (feasible or not, with the reason), one row each.
- `pareto.csv`: the frontier of tokens/s/device vs tokens/s/user over feasible configurations.
- `pareto.png`: a curve per layout (its own frontier over batch and chunk), the global frontier highlighted.
"""

from __future__ import annotations

import csv
from pathlib import Path

from moejax.planner.memory import GIB
from moejax.planner.serving import Prediction
from moejax.planner.sweep import Plan, pareto_frontier

FIELDS = list(Prediction.__dataclass_fields__)


def format_table(rows: list[Prediction], limit: int = 15) -> str:
    """A fixed-width table of predictions."""
    header = (f"{'#':>3} {'layout':<16} {'batch':>6} {'chunk':>6} {'tok/s/dev':>10} {'tok/s/user':>10} "
              f"{'TTFT s':>8} {'TPOT ms':>8} {'GiB/dev':>8} {'bound':<8}")
    lines = [header, "-" * len(header)]
    for i, p in enumerate(rows[:limit], 1):
        lines.append(f"{i:>3} {p.layout:<16} {p.batch_size:>6} {p.chunk_size:>6} {p.tokens_per_s_per_device:>10.1f} "
                     f"{p.tokens_per_s_per_user:>10.1f} {p.ttft_s:>8.3f} {p.tpot_s * 1e3:>8.2f} "
                     f"{p.mem_per_device_bytes / GIB:>8.1f} {p.bound:<8}")
    return "\n".join(lines)


def format_summary(result: Plan, limit: int = 15, paths: dict[str, Path] | None = None) -> str:
    """What `moejax plan` prints: rules, counts, the ranking at the target, infeasible examples, file paths."""
    w, c = result.workload, result.count
    out = [f"moejax plan: {result.model} on {result.devices} x {result.hardware}, weights {w.precision}, "
           f"KV {w.kv_precision}, isl {w.isl}, osl {w.osl}, EP attention '{result.options.ep_attention}'",
           "", "Rules:"]
    out += [f"  - {r}" for r in result.rules]
    out += ["", f"Layouts: {c['layouts_total']} of {result.devices} devices, {c['layouts_valid']} valid, "
                f"{len(result.rejected)} rejected by the rules",
            f"Configurations (layout x batch x chunk): {c['configs']}, {c['configs_feasible']} fit in memory, "
            f"{c['configs_infeasible']} do not"]
    for layout, reasons in result.rejected[:5]:
        out.append(f"  rejected {layout}: {reasons[0]}")
    infeasible = [p for p in result.predictions if not p.feasible]
    for p in infeasible[:3]:
        out.append(f"  infeasible {p.layout} batch {p.batch_size} chunk {p.chunk_size}: {p.reason}")
    out += ["", f"Best configuration per layout at >= {result.target_tps_user:g} tokens/s/user "
                f"({len(result.ranking)} layouts qualify):"]
    out.append(format_table(result.ranking, limit) if result.ranking else "  (none: lower --target-tps-user)")
    out += ["", f"Pareto frontier: {len(result.pareto)} configurations"]
    if paths:
        out += [""] + [f"{name}: {path}" for name, path in paths.items()]
    out.append(f"planned in {result.seconds:.2f} s")
    return "\n".join(out)


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

    by_layout: dict[str, list[Prediction]] = {}
    for p in result.predictions:
        by_layout.setdefault(p.layout, []).append(p)
    curves = {name: pareto_frontier(ps) for name, ps in by_layout.items()}
    curves = {k: v for k, v in curves.items() if v}
    best = sorted(curves, key=lambda k: -max(p.tokens_per_s_per_device for p in curves[k]))[:max_layouts]
    fig, ax = plt.subplots(figsize=(9, 6))
    for name in best:
        pts = curves[name]
        ax.plot([p.tokens_per_s_per_user for p in pts], [p.tokens_per_s_per_device for p in pts],
                marker=".", lw=1, alpha=0.7, label=name)
    front = result.pareto
    ax.plot([p.tokens_per_s_per_user for p in front], [p.tokens_per_s_per_device for p in front],
            color="black", lw=2.5, marker="o", ms=4, label="Pareto frontier", zorder=5)
    if result.target_tps_user:
        ax.axvline(result.target_tps_user, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel("tokens/s per device (throughput)")
    w = result.workload
    ax.set_title(f"{result.model} on {result.devices} x {result.hardware} ({w.precision}, isl {w.isl}, osl {w.osl})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(result: Plan, out_dir: Path | str, plot: bool = True) -> dict[str, Path]:
    """Write configs.csv, pareto.csv and (if `plot`) pareto.png into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    paths = {"configs_csv": write_csv(result.predictions, out_dir / "configs.csv"),
             "pareto_csv": write_csv(result.pareto, out_dir / "pareto.csv")}
    if plot:
        paths["pareto_png"] = plot_pareto(result, out_dir / "pareto.png")
    return paths
