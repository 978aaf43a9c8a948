"""Sweep plots (PNG, matplotlib): the throughput / interactivity trade-off beside the planner, and latency vs chunk.

- `tradeoff.png`: tokens/s/device against tokens/s/user, one colour and marker per layout (and expert
  mode), every measured configuration a point; the measured frontier (configurations no other beats
  on both axes) drawn through its points, each labelled with its layout; the planner's predicted
  frontier for the same hardware, model and request shape over the same layouts, chunk sizes and
  batch sizes (powers of two spanning the swept max_running), dashed, its points labelled too.
  Labels never overlap (`place_labels`): where no free place is left by a point, its label is left
  out, measured ones last, and the x-axis title says how many.
- `latency_vs_chunk.png`: mean TTFT and mean TPOT against the prefill chunk size, a line per
  (layout, expert mode, max_running): the layout sets colour and marker, max_running the line style.

Every line has a legend entry. `styles` gives each label its own (colour, marker) pair however many
there are: up to 20 labels take the tab20 colours, more take evenly spaced colours of a continuous
map, and markers cycle through 13 shapes.
"""

from __future__ import annotations

from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d")
LINESTYLES = ("-", "--", ":", "-.")
# Where a point's label may go, in points from it: right above, right below, left above, left below, then further.
LABEL_OFFSETS = ((4, 5), (4, -12), (-4, 5), (-4, -12), (4, 16), (4, -23), (-4, 16), (-4, -23))


def styles(labels: list[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A distinct (RGBA colour, marker) per label, in the order given."""
    import matplotlib

    n = len(labels)
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        # tab20 alternates dark and light shades of 10 hues: take all dark ones first, then the light ones.
        colours = [cmap((2 * i) % 20 + (2 * i) // 20) for i in range(n)]
    else:
        cmap = matplotlib.colormaps["turbo"]
        colours = [cmap(i / max(n - 1, 1)) for i in range(n)]
    return {label: (tuple(colours[i]), MARKERS[i % len(MARKERS)]) for i, label in enumerate(labels)}


def _label(row: dict, modes: set[str]) -> str:
    return row["layout"] if len(modes) <= 1 else f"{row['layout']} ({row['expert_mode']})"


def _frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (x = tokens/s/user, y = tokens/s/device, label) no other point beats on both, by rising x."""
    front, best = [], float("-inf")
    for x, y, name in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front[::-1]


def _legend(ax) -> list[tuple[str, str, str]]:
    """(label, colour hex, marker) of every legend entry actually drawn."""
    import matplotlib.colors as mcolors

    handles, labels = ax.get_legend_handles_labels()
    return [(label, mcolors.to_hex(h.get_color()), str(h.get_marker())) for h, label in zip(handles, labels,
                                                                                          strict=True)]


def planner_frontier(rows: list[dict], hw) -> list[tuple[float, float, str]]:
    """The planner's predicted frontier for the rows' model, layouts, chunk sizes and request shape on `hw`."""
    from moejax.config import load_model_config
    from moejax.mesh import Layout
    from moejax.planner.serving import predict
    from moejax.planner.workload import Options
    from moejax.planner.workload import Workload as PlanWorkload

    cfg = load_model_config(rows[0]["model"])
    r0 = rows[0]
    workload = PlanWorkload(isl=r0["isl"], osl=r0["osl"], precision=r0["precision"], kv_precision=r0["kv_precision"])
    chunks = sorted({r["chunk_size"] for r in rows})
    swept = {r["max_running"] for r in rows}
    lo, hi = min(swept), max(swept)
    totals = sorted(swept | {2**k for k in range(32) if lo <= 2**k <= hi})  # requests over the mesh
    points = []
    for layout, mode in sorted({(r["layout"], r["expert_mode"]) for r in rows}):
        lay = Layout.parse(layout)
        for total in (t for t in totals if t % lay.data == 0):
            for chunk in chunks:
                p = predict(cfg, lay, hw, workload, Options(expert_mode=mode), batch=total // lay.data, chunk=chunk)
                if p.feasible:
                    points.append((p.tokens_per_s_per_user, p.tokens_per_s_per_device, layout))
    return _frontier(points)


def place_labels(ax, points: list[tuple[float, float, str]], placed: list | None = None,
                 **text_kw) -> tuple[list, int]:
    """Label points so that no two labels overlap; returns (the annotations drawn, how many were left out).

    Each (x, y, text) in turn takes the first offset of `LABEL_OFFSETS` (right or left of the point, above or
    below) whose box, measured in display coordinates with the figure's renderer, lies inside the axes and
    overlaps no box in `placed` (which it joins); a label no offset fits is left out, so put the most
    important points first. Call it once the axes' scales, limits and size are final: the boxes are measured
    then (saving at another dpi scales every box alike, so they still do not overlap).
    """
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [] if placed is None else placed
    drawn, left_out = [], 0
    for x, y, text in points:
        for dx, dy in LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                               ha="left" if dx >= 0 else "right", **text_kw)
            box = note.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                drawn.append(note)
                break
            note.remove()
        else:
            left_out += 1
    return drawn, left_out


def tradeoff_figure(rows: list[dict], hw=None):
    """The trade-off figure of tradeoff.png (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = {r["expert_mode"] for r in rows}
    labels = list(dict.fromkeys(_label(r, modes) for r in rows))
    style = styles(labels)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for name in labels:
        pts = [r for r in rows if _label(r, modes) == name]
        colour, marker = style[name]
        ax.plot([r["tokens_per_s_per_user"] for r in pts], [r["tokens_per_s_per_device"] for r in pts],
                ls="none", marker=marker, color=colour, ms=7, label=name)
    measured = _frontier([(r["tokens_per_s_per_user"], r["tokens_per_s_per_device"], _label(r, modes))
                          for r in rows])
    ax.plot([p[0] for p in measured], [p[1] for p in measured], color="black", lw=2, zorder=4,
            label="measured frontier")
    predicted = planner_frontier(rows, hw) if hw is not None else []
    if predicted:
        ax.plot([p[0] for p in predicted], [p[1] for p in predicted], color="grey", ls="--", lw=1.5,
                marker=".", label=f"planner frontier ({hw.name})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s per device")
    r0 = rows[0]
    sizes = "/".join(str(n) for n in sorted({r["devices"] for r in rows}, reverse=True))
    title = f"{r0['model']}: measured on {sizes} {r0['platform']} device(s), isl {r0['isl']}, osl {r0['osl']}"
    if r0["platform"] == "cpu":
        title += "\nsimulated CPU devices share the host's cores: correctness and communication, not speed"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1 + len(labels) // 24, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    placed: list = []  # measured labels first: where space runs out, the planner's give way
    _, left_out = place_labels(ax, measured, placed, fontsize=7, weight="bold")
    _, planner_left_out = place_labels(ax, predicted, placed, fontsize=6, color="grey")
    left_out += planner_left_out
    ax.set_xlabel("tokens/s per user (1 / TPOT)" + (f"\n({left_out} frontier label{'s' * (left_out > 1)} left out "
                                                    f"where {'they' if left_out > 1 else 'it'} would overlap "
                                                    f"another)" if left_out else ""))
    return fig


def plot_tradeoff(rows: list[dict], path: Path, hw=None) -> tuple[Path, list[tuple[str, str, str]]]:
    """Write tradeoff.png (see the module docstring); returns (path, legend entries (label, colour, marker))."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(rows, hw)
    legend = _legend(fig.axes[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path, legend


def plot_latency_vs_chunk(rows: list[dict], path: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """Write latency_vs_chunk.png (see the module docstring); returns (path, legend entries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = {r["expert_mode"] for r in rows}
    layouts = list(dict.fromkeys(_label(r, modes) for r in rows))
    style = styles(layouts)
    running = sorted({r["max_running"] for r in rows})
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(12, 5))
    for name in layouts:
        colour, marker = style[name]
        for i, mr in enumerate(running):
            pts = sorted((r for r in rows if _label(r, modes) == name and r["max_running"] == mr),
                         key=lambda r: r["chunk_size"])
            if not pts:
                continue
            label = name if len(running) == 1 else f"{name}, max_running {mr}"
            ls = LINESTYLES[i % len(LINESTYLES)]
            chunks = [r["chunk_size"] for r in pts]
            ax_ttft.plot(chunks, [r["ttft_s"] * 1e3 for r in pts], ls=ls, marker=marker, color=colour, label=label)
            ax_tpot.plot(chunks, [r["tpot_s"] * 1e3 for r in pts], ls=ls, marker=marker, color=colour, label=label)
    for ax, what in ((ax_ttft, "mean TTFT (ms)"), (ax_tpot, "mean TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefill chunk size (tokens)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_tpot.legend(fontsize=7, ncol=1 + len(ax_tpot.get_lines()) // 24, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    legend = _legend(ax_tpot)
    r0 = rows[0]
    fig.suptitle(f"{r0['model']} on {r0['platform']}: time to first token and per output token vs chunk size"
                 + (" (CPU: not a speed comparison)" if r0["platform"] == "cpu" else ""), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path, legend


def write_plots(rows: list[dict], out: Path, hw=None) -> dict[str, Path]:
    """Both plots into folder `out`; returns their paths."""
    return {"tradeoff_png": plot_tradeoff(rows, Path(out) / "tradeoff.png", hw)[0],
            "latency_png": plot_latency_vs_chunk(rows, Path(out) / "latency_vs_chunk.png")[0]}
