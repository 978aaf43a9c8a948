"""Calibration: compare predictions with measured runs, and fit a hardware's efficiency factors to them.

Measurement file: JSON lines, one object per measured configuration (the moejax benchmarks write it):

    {"model": "mixtral-8x7b",        # ModelConfig name (configs/models/) or path, as `load_model_config` takes
     "hardware": "h100-sxm",         # Hardware name (configs/hardware/) or path
     "layout": "TP2EP4",             # `Layout.parse` syntax; its product is the device count
     "precision": "bf16",            # weight format: fp32 | bf16 | fp8 | fp4
     "kv_precision": "bf16",         # optional, default bf16
     "batch_size": 32,               # concurrent requests over the whole mesh (all data-parallel replicas)
     "chunk_size": 512,              # prefill chunk (tokens per step per attention group)
     "isl": 1024, "osl": 256,        # prompt and output tokens per request
     "ttft_s": 0.21,                 # mean time to first token, seconds
     "tpot_s": 0.031,                # mean time per output token after the first, seconds
     "tokens_per_s_per_device": 15.2,  # output tokens/s over the run / devices
     "tokens_per_s_per_user": 32.3,    # 1 / tpot_s
     "ep_attention": "replicated"}   # optional: how the run treated attention on the expert axis (default
                                     # 'replicated', what the moejax runtime does)

Extra keys are kept and ignored. `batch_size` must be a multiple of the layout's data factor.

Fitting: the factors of `Efficiency` (compute, memory, network, step_overhead_s) minimise the mean squared
log error of TTFT and TPOT over the measurements (throughput follows from them). The search is Nelder-Mead in
log space, which needs no gradients and handles the max() of the roofline. Factors a measurement set cannot
see (e.g. network on single-device runs) stay near their starting value; fit only the ones the runs exercise.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml

from moejax.config import ModelConfig, load_model_config
from moejax.mesh import Layout
from moejax.planner.hardware import Efficiency, Hardware
from moejax.planner.serving import Prediction, predict
from moejax.planner.workload import Options, Workload

REQUIRED = ("model", "hardware", "layout", "precision", "batch_size", "chunk_size", "isl", "osl",
            "ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user")
METRICS = ("ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user")
FACTORS = ("compute", "memory", "network", "step_overhead_s")


def read_measurements(path: str | Path) -> list[dict]:
    """Read and check a JSON-lines measurement file (schema in the module docstring)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing keys {missing}")
        layout = Layout.parse(row["layout"])
        if row["batch_size"] % layout.data:
            raise ValueError(f"{path}:{n}: batch_size {row['batch_size']} is not a multiple of DP {layout.data}")
        rows.append(row)
    return rows


@functools.lru_cache(maxsize=32)
def _model(name: str) -> ModelConfig:
    return load_model_config(name)


def predict_measurement(row: dict, hw: Hardware, options: Options | None = None) -> Prediction:
    """The planner's prediction for the configuration a measurement describes."""
    layout = Layout.parse(row["layout"])
    workload = Workload(isl=row["isl"], osl=row["osl"], precision=row["precision"],
                        kv_precision=row.get("kv_precision", "bf16"))
    options = options or Options(ep_attention=row.get("ep_attention", "replicated"))
    return predict(_model(row["model"]), layout, hw, workload, options,
                   batch=row["batch_size"] // layout.data, chunk=row["chunk_size"])


def prediction_errors(rows: Sequence[dict], hw: Hardware, options: Options | None = None) -> list[dict]:
    """Per measurement: layout, batch, chunk, and for each metric measured, predicted and relative error."""
    out = []
    for row in rows:
        p = predict_measurement(row, hw, options).as_dict()
        entry = {"layout": row["layout"], "batch_size": row["batch_size"], "chunk_size": row["chunk_size"]}
        for metric in METRICS:
            entry[metric] = {"measured": row[metric], "predicted": p[metric],
                             "rel_error": p[metric] / row[metric] - 1.0}
        out.append(entry)
    return out


def _loss(rows: Sequence[dict], hw: Hardware, options: Options | None) -> float:
    errs = []
    for row in rows:
        p = predict_measurement(row, hw, options)
        errs += [math.log(p.ttft_s / row["ttft_s"]), math.log(p.tpot_s / row["tpot_s"])]
    return float(np.mean(np.square(errs)))


def fit_efficiency(rows: Sequence[dict], hw: Hardware, options: Options | None = None,
                   factors: Sequence[str] = FACTORS, max_iter: int = 600) -> tuple[Efficiency, float]:
    """Fit `hw`'s efficiency factors to measurements.

    Args:
        rows: measurements (`read_measurements`), all on hardware of the same kind as `hw`.
        hw: the hardware; its current factors are the starting point and the value of factors not fitted.
        options: modelling options (default: each row's `ep_attention`).
        factors: which of compute, memory, network, step_overhead_s to fit.
        max_iter: Nelder-Mead iterations.

    Returns:
        (fitted Efficiency, final mean squared log error of TTFT and TPOT).
    """
    unknown = set(factors) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown efficiency factors {sorted(unknown)}; known {FACTORS}")
    start = hw.efficiency.as_dict()
    x0 = np.log([max(start[f], 1e-9) for f in factors])

    def efficiency(x: np.ndarray) -> Efficiency:
        values = dict(start)
        for f, v in zip(factors, np.exp(x), strict=True):
            values[f] = min(float(v), 1.5) if f != "step_overhead_s" else float(v)
        return Efficiency(**values)

    def objective(x: np.ndarray) -> float:
        return _loss(rows, hw.with_efficiency(efficiency(x)), options)

    x, loss = _nelder_mead(objective, x0, max_iter)
    return efficiency(x), loss


def _nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, max_iter: int, step: float = 0.3,
                 tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Minimise `f` from `x0` with the Nelder-Mead simplex (standard coefficients)."""
    n = len(x0)
    simplex = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(max_iter):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    best = int(np.argmin(values))
    return simplex[best], values[best]


def save_efficiency(efficiency: Efficiency, path: str | Path, hardware: str = "", loss: float | None = None,
                    measurements: int | None = None) -> Path:
    """Write fitted factors as YAML; `load_hardware(name, efficiency=path)` reads them back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"hardware": hardware, "efficiency": efficiency.as_dict()}
    if loss is not None:
        doc["mean_squared_log_error"] = loss
    if measurements is not None:
        doc["measurements"] = measurements
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def format_errors(errors: list[dict]) -> str:
    """A table of the relative prediction error per measured configuration."""
    lines = [f"{'layout':<14} {'batch':>6} {'chunk':>6} " + " ".join(f"{m[:-2] if m.endswith('_s') else m:>24}"
                                                                   for m in METRICS)]
    for e in errors:
        cells = " ".join(f"{e[m]['rel_error']:>+24.1%}" for m in METRICS)
        lines.append(f"{e['layout']:<14} {e['batch_size']:>6} {e['chunk_size']:>6} {cells}")
    return "\n".join(lines)
