"""The planner against the aiconfigurator reference (`moejax.planner.reference`): errors, ranking, a published figure.

    python -m moejax.planner.compare [--reference tests/planner/data/aiconfigurator_reference.csv]
        [--calibration FILE] [--fit] [--holdout] [--save FILE]

- Errors: per metric (TPOT, TTFT, tokens/s/GPU) the ratio predicted / reference of every 'compare' row; the table
  gives the median and worst factor max(r, 1/r). TTFT is also compared with the reference's queue-free TTFT:
  aiconfigurator multiplies its prefill time by a heuristic queueing factor min(2 + (ceil(isl x bs / ctx) - 3)
  / 20, 4) (TensorRT-LLM backend, `_ttft_queuing_factor`), which `ttft_noqueue` divides out.
- Ranking: the 'rank' rows (Qwen3-235B-A22B FP8, 8 x H200, 18 layouts x 9 batch sizes): per layout the best
  tokens/s/GPU with tokens/s/user >= target, by the reference and by the planner on the same configurations;
  Spearman's rank correlation over the layouts both qualify. The best over the batch sizes run jumps by up to
  2x when a prediction crosses the target; the interpolated variant reads each layout's throughput-interactivity
  curve (log-log between the batches around the target) at exactly the target.
- Published: Mixtral-8x7B FP8 on 2 x H100, offline at batch ~1024: ~21,000 output tokens/s (NVIDIA technical
  blog, "Achieving High Mixtral 8x7B Performance with NVIDIA H100 Tensor Core GPUs and NVIDIA TensorRT-LLM",
  2024); the planner's best of TP2, EP2 and DP2 at 1024 concurrent requests, isl = osl = 128 and 1024 / 128.
- `--fit` fits the efficiency curves to all rows (in-sample); `--holdout` fits once per model on the other
  models' rows and predicts the held-out model's rows (leave-one-model-out, out-of-sample), and ranks the
  ranking study with curves fitted on the comparison rows only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from moejax.planner.calibrate import fit_efficiency, predict_measurement, save_efficiency
from moejax.planner.hardware import Efficiency, Hardware, load_hardware
from moejax.planner.reference import read_reference

REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "planner" / "data" / "aiconfigurator_reference.csv"
HARDWARE = ("h100-sxm", "h200")
PUBLISHED_MIXTRAL = 21_000.0


def reference_rows(path: str | Path = REFERENCE) -> list[dict]:
    """The reference rows as measurements (attention data-parallel over the expert axis, TensorRT-LLM's DEP)."""
    rows = read_reference(path)
    for r in rows:
        r["expert_mode"] = "dp_attention"
        qf = min(2 + (math.ceil(r["isl"] * r["bs"] / r["chunk_size"]) - 3) / 2 / 10, 4)
        r["ttft_noqueue_s"] = r["ttft_s"] / qf
    return rows


def hardware(efficiency: Efficiency | str | Path | None = None) -> dict[str, Hardware]:
    """The reference's hardware, with other efficiency curves if given (an Efficiency or a calibration file)."""
    if isinstance(efficiency, Efficiency):
        return {n: load_hardware(n).with_efficiency(efficiency) for n in HARDWARE}
    return {n: load_hardware(n, efficiency=efficiency) for n in HARDWARE}


def ratios(rows: Sequence[dict], hw: Mapping[str, Hardware]) -> dict[str, np.ndarray]:
    """Predicted / reference per metric for `rows`."""
    preds = [predict_measurement(r, hw) for r in rows]
    out = {m: np.array([getattr(p, m) / r[m] for p, r in zip(preds, rows, strict=True)])
           for m in ("tpot_s", "ttft_s", "tokens_per_s_per_device")}
    out["ttft_noqueue_s"] = np.array([p.ttft_s / r["ttft_noqueue_s"] for p, r in zip(preds, rows, strict=True)])
    return out


def factor_stats(r: np.ndarray) -> tuple[float, float, float]:
    """(median factor, worst factor, geometric-mean ratio) of ratios r, a factor being max(r, 1/r)."""
    f = np.exp(np.abs(np.log(r)))
    return float(np.median(f)), float(np.max(f)), float(np.exp(np.mean(np.log(r))))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x)
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _at_target(points: list[tuple[float, float]], target: float, interpolate: bool) -> float | None:
    """Best tokens/s/GPU at tokens/s/user >= target over (tokens/s/user, tokens/s/GPU) points of one layout; with
    `interpolate`, read off the curve through the points at exactly the target (log-log between neighbours)."""
    ok = [d for u, d in points if u >= target]
    if not ok:
        return None
    best = max(ok)
    if not interpolate:
        return best
    above = min((p for p in points if p[0] >= target), key=lambda p: p[0])
    below = [p for p in points if p[0] < target]
    if not below:
        return best
    nxt = max(below, key=lambda p: p[0])
    w = math.log(above[0] / target) / math.log(above[0] / nxt[0])
    return max(best, math.exp((1 - w) * math.log(above[1]) + w * math.log(nxt[1])))


def ranking(rows: Sequence[dict], hw: Mapping[str, Hardware], target: float, interpolate: bool = False
            ) -> tuple[float, int]:
    """(Spearman correlation, layouts compared) of the per-layout best tokens/s/GPU at tokens/s/user >= target
    (over the batch sizes run; `interpolate`: on the curve through them, at the target)."""
    preds = [predict_measurement(r, hw) for r in rows]
    ref: dict[str, list] = {}
    plan: dict[str, list] = {}
    for r, p in zip(rows, preds, strict=True):
        ref.setdefault(r["layout"], []).append((r["tokens_per_s_per_user"], r["tokens_per_s_per_device"]))
        plan.setdefault(r["layout"], []).append((p.tokens_per_s_per_user, p.tokens_per_s_per_device))
    best_ref = {k: _at_target(v, target, interpolate) for k, v in ref.items()}
    best_plan = {k: _at_target(v, target, interpolate) for k, v in plan.items()}
    common = sorted(k for k in ref if best_ref[k] is not None and best_plan[k] is not None)
    if len(common) < 3:
        return float("nan"), len(common)
    return spearman([best_ref[k] for k in common], [best_plan[k] for k in common]), len(common)


def mixtral_offline(hw: Mapping[str, Hardware]) -> dict[str, float]:
    """The planner's best total output tokens/s of Mixtral-8x7B FP8 on 2 x H100 at 1024 concurrent requests."""
    from moejax.config import load_model_config
    from moejax.planner.serving import predict
    from moejax.planner.workload import Workload

    cfg, out = load_model_config("mixtral-8x7b"), {}
    for isl, osl in ((128, 128), (1024, 128)):
        w = Workload(isl=isl, osl=osl, precision="fp8", kv_precision="fp8")
        best = 0.0
        for layout in ("TP2", "EP2", "DP2"):
            replicas = 2 if layout == "DP2" else 1
            for chunk in (2048, 4096, 8192):
                p = predict(cfg, layout, hw["h100-sxm"], w, batch=1024 // replicas, chunk=chunk)
                best = max(best, 2 * p.tokens_per_s_per_device)
        out[f"isl{isl}_osl{osl}"] = best
    return out


def summary(rows: Sequence[dict], hw: Mapping[str, Hardware]) -> dict:
    """Error factors, ranking correlations and the Mixtral figure for one set of efficiency curves."""
    cmp = [r for r in rows if r["set"] == "compare"]
    rank_rows = [r for r in rows if r["set"] == "rank"]
    out = {m: factor_stats(v) for m, v in ratios(cmp, hw).items()}
    for target in (20.0, 50.0):
        out[f"rank@{target:g}"] = ranking(rank_rows, hw, target)
        out[f"rank~{target:g}"] = ranking(rank_rows, hw, target, interpolate=True)
    out["mixtral"] = mixtral_offline(hw)
    return out


def fit(rows: Sequence[dict], start: Efficiency | Mapping[str, Hardware], **fit_kwargs) -> tuple[Efficiency, float]:
    """Fit the curves to reference rows (fractions of peak <= 1), TTFT taken without the reference's queueing
    heuristic."""
    hw = hardware(start) if isinstance(start, Efficiency) else start
    return fit_efficiency([r | {"ttft_s": r["ttft_noqueue_s"]} for r in rows], hw, max_fraction=1.0, **fit_kwargs)


def holdout(rows: Sequence[dict], start: Efficiency, **fit_kwargs) -> dict:
    """Leave-one-model-out: each model's rows predicted with curves fitted on the other models' rows."""
    models = sorted({r["model"] for r in rows})
    cmp_ratios: dict[str, list] = {}
    rank_out = {}
    for model in models:
        train = [r for r in rows if r["model"] != model]
        test = [r for r in rows if r["model"] == model]
        eff, _ = fit(train, start, **fit_kwargs)
        hw = hardware(eff)
        for m, v in ratios([r for r in test if r["set"] == "compare"], hw).items():
            cmp_ratios.setdefault(m, []).extend(v)
        if any(r["set"] == "rank" for r in test):
            for target in (20.0, 50.0):
                for key, interp in (("@", False), ("~", True)):
                    rank_out[f"rank{key}{target:g}"] = ranking([r for r in test if r["set"] == "rank"], hw, target,
                                                               interp)
        if model == "mixtral-8x7b":
            rank_out["mixtral"] = mixtral_offline(hw)
    return {m: factor_stats(np.array(v)) for m, v in cmp_ratios.items()} | rank_out


def holdout_ranking(rows: Sequence[dict], start: Efficiency, **fit_kwargs) -> dict:
    """Ranking with curves fitted on the 'compare' rows only (none of the ranking study's configurations)."""
    eff, _ = fit([r for r in rows if r["set"] == "compare"], start, **fit_kwargs)
    hw, rank_rows = hardware(eff), [r for r in rows if r["set"] == "rank"]
    return {f"rank{key}{t:g}": ranking(rank_rows, hw, t, interp) for t in (20.0, 50.0)
            for key, interp in (("@", False), ("~", True))}


def format_summary(name: str, s: dict) -> str:
    cells = [name]
    for m in ("tpot_s", "ttft_s", "ttft_noqueue_s", "tokens_per_s_per_device"):
        med, worst, gm = s[m]
        cells.append(f"{med:.2f} / {worst:.2f} ({gm:.2f})")
    for t in ("20", "50"):
        (rho, n), (rho_i, _) = s.get(f"rank@{t}", (float("nan"), 0)), s.get(f"rank~{t}", (float("nan"), 0))
        cells.append(f"{rho:.2f} / {rho_i:.2f} ({n})")
    mix = s.get("mixtral", {})
    cells.append(" / ".join(f"{v:,.0f}" for v in mix.values()))
    return "| " + " | ".join(cells) + " |"


HEADER = ("| curves | TPOT median / worst (geo. mean ratio) | TTFT | TTFT, reference without its queueing factor | "
          "tokens/s/GPU | rank corr. >= 20 tok/s/user, run batches / interpolated (layouts) | >= 50 | "
          "Mixtral-8x7B FP8 2xH100 tok/s (isl/osl 128/128 / 1024/128) |\n|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.planner.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=str(REFERENCE))
    p.add_argument("--calibration", default=None, help="efficiency curves file (default: the hardware files')")
    p.add_argument("--fit", action="store_true", help="also fit the curves to every row (in-sample)")
    p.add_argument("--holdout", action="store_true", help="also fit leaving each model out (out-of-sample)")
    p.add_argument("--save", default=None, help="write the in-sample fit here (YAML, for --calibration)")
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args(argv)
    rows = reference_rows(args.reference)
    base = hardware(args.calibration)
    print(HEADER)
    print(format_summary("hardware files" if not args.calibration else args.calibration, summary(rows, base)))
    start = base["h200"].efficiency
    print(format_summary("round defaults (Efficiency())", summary(rows, hardware(Efficiency()))))
    if args.fit or args.save:
        eff, loss = fit(rows, base, max_iter=args.steps)
        print(format_summary(f"fit to all rows (in-sample, loss {loss:.3f})", summary(rows, hardware(eff))))
        if args.save:
            save_efficiency(eff, args.save, hardware="h100-sxm, h200", loss=loss, measurements=len(rows))
            print(f"saved {args.save}: {eff.as_dict()}")
    if args.holdout:
        print(format_summary("leave one model out (out-of-sample)", holdout(rows, start, max_iter=args.steps)))
        ranks = holdout_ranking(rows, start, max_iter=args.steps)
        print(f"ranking with curves fitted on the comparison rows only: {ranks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
