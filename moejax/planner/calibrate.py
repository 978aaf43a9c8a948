"""Calibration: compare predictions with measured runs, and fit a hardware's efficiency curves to them.

Measurement file: JSON lines, one object per measured configuration (the moejax benchmarks write it):

    {"model": "mixtral-8x7b",        # ModelConfig name (configs/models/) or path, as `load_model_config` takes
     "hardware": "h100-sxm",         # Hardware name (configs/hardware/) or path
     "layout": "TP2EP4",             # `Layout.parse` syntax (or `PlanLayout`'s, e.g. TP8MTP1EP8); product = devices
     "precision": "bf16",            # weight format: fp32 | bf16 | fp8 | fp4
     "kv_precision": "bf16",         # optional, default bf16
     "prefix_hit_rate": 0.0,         # optional, default 0: fraction of prompt tokens served from the prefix cache
     "batch_size": 32,               # concurrent requests over the whole mesh (all data-parallel replicas)
     "chunk_size": 512,              # prefill chunk (tokens per step per attention group)
     "isl": 1024, "osl": 256,        # prompt and output tokens per request
     "ttft_s": 0.21,                 # mean time to first token, seconds
     "tpot_s": 0.031,                # mean time per output token after the first, seconds
     "tokens_per_s_per_device": 15.2,  # output tokens/s over the run / devices
     "tokens_per_s_per_user": 32.3,    # 1 / tpot_s
     "expert_mode": "replicated_attention"}   # optional: how the run treated attention on the expert axis (rows
                                     # without it predate the choice: 'replicated_attention'; ep_attention is read)

Extra keys are kept and ignored. `batch_size` must be a multiple of the layout's data factor.

Fitting: the efficiency curves (`moejax.planner.hardware.Efficiency`, 19 parameters) minimise the mean squared
log error of TTFT, TPOT and tokens/s/device over the measurements. The cost model is `jax.numpy` code
(`moejax.planner.serving.evaluate`) run under `jax.vmap` over every measurement at once and differentiated
with `jax.grad`; optax's Adam (cosine-decayed step) descends on the logarithms of the parameters (so they stay
positive). Rows may come from several hardware types (`hw` a mapping by name) sharing one set of curves.
Parameters a measurement set cannot see (e.g. network on single-device runs) stay near their starting value;
fit only the ones the runs exercise (`factors`).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from moejax.axes import DEPRECATED_EXPERT_MODES
from moejax.config import ModelConfig, load_model_config
from moejax.planner.hardware import FRACTIONS, Efficiency, Hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.serving import Prediction, evaluate, features, predict, stack
from moejax.planner.workload import Options, Workload

REQUIRED = ("model", "hardware", "layout", "precision", "batch_size", "chunk_size", "isl", "osl",
            "ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user")
METRICS = ("ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user")
FIT_METRICS = ("ttft_s", "tpot_s", "tokens_per_s_per_device")
FACTORS = tuple(Efficiency.__dataclass_fields__)


def read_measurements(path: str | Path) -> list[dict]:
    """Read and check a JSON-lines measurement file (schema in the module docstring). Rows of disaggregated runs
    (`prefill_layout` set: their throughput is two layouts') are left out, with a line on stderr saying how many."""
    rows, disaggregated = [], 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("prefill_layout"):
            disaggregated += 1
            continue
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing keys {missing}")
        layout = PlanLayout.of(row["layout"])
        if row["batch_size"] % layout.data:
            raise ValueError(f"{path}:{n}: batch_size {row['batch_size']} is not a multiple of DP {layout.data}")
        rows.append(row)
    if disaggregated:
        print(f"{path}: left out {disaggregated} disaggregated row(s) (prefill_layout set): the calibration fits "
              f"aggregated runs", file=sys.stderr)
    return rows


@functools.lru_cache(maxsize=32)
def _model(name: str) -> ModelConfig:
    return load_model_config(name)


def _options(row: dict, options: Options | None) -> Options:
    if options is not None:
        return options
    old = row.get("ep_attention")  # rows written before the expert modes were renamed
    mode = row.get("expert_mode") or DEPRECATED_EXPERT_MODES.get(old, old) or "replicated_attention"
    return Options(expert_mode=mode, microbatches=row.get("microbatches"))


def _workload(row: dict) -> Workload:
    return Workload(isl=row["isl"], osl=row["osl"], precision=row["precision"],
                    kv_precision=row.get("kv_precision", "bf16"), prefix_hit_rate=row.get("prefix_hit_rate", 0.0))


def _batch(row: dict) -> tuple[PlanLayout, int]:
    layout = PlanLayout.of(row["layout"])
    return layout, row["batch_size"] // layout.data


def _hw(hw: Hardware | Mapping[str, Hardware], row: dict) -> Hardware:
    return hw[row["hardware"]] if isinstance(hw, Mapping) else hw


def predict_measurement(row: dict, hw: Hardware | Mapping[str, Hardware], options: Options | None = None
                        ) -> Prediction:
    """The planner's prediction for the configuration a measurement describes."""
    layout, batch = _batch(row)
    return predict(_model(row["model"]), row["layout"], _hw(hw, row), _workload(row), _options(row, options),
                   batch=batch, chunk=row["chunk_size"])


def prediction_errors(rows: Sequence[dict], hw: Hardware | Mapping[str, Hardware], options: Options | None = None
                      ) -> list[dict]:
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


def measurement_features(rows: Sequence[dict], hw: Hardware | Mapping[str, Hardware],
                         options: Options | None = None) -> dict[str, np.ndarray]:
    """The stacked `moejax.planner.serving.features` of every measured configuration (efficiency-free)."""
    feats = []
    for row in rows:
        layout, batch = _batch(row)
        feats.append(features(_model(row["model"]), row["layout"], _hw(hw, row), _workload(row),
                              _options(row, options), batch, row["chunk_size"]))
    return stack(feats)


def predict_batch(feats: dict, efficiency: Efficiency | dict) -> dict:
    """`evaluate` of stacked features in jax.numpy under `jax.vmap` (differentiable in `efficiency`)."""
    import jax
    import jax.numpy as jnp

    eff = efficiency.as_dict() if isinstance(efficiency, Efficiency) else efficiency
    return jax.vmap(lambda f: evaluate(f, eff, jnp))({k: jnp.asarray(v) for k, v in feats.items()})


def log_loss(feats: dict, targets: dict[str, np.ndarray], efficiency: dict,
             metrics: Sequence[str] = FIT_METRICS) -> float:
    """Mean squared log error of `metrics` (jax.numpy; differentiable in `efficiency`)."""
    import jax.numpy as jnp

    pred = predict_batch(feats, efficiency)
    return jnp.mean(jnp.stack([jnp.mean(jnp.log(pred[m] / targets[m]) ** 2) for m in metrics]))


def fit_efficiency(rows: Sequence[dict], hw: Hardware | Mapping[str, Hardware], options: Options | None = None,
                   factors: Sequence[str] = FACTORS, max_iter: int = 800, learning_rate: float = 0.05,
                   metrics: Sequence[str] = FIT_METRICS, max_fraction: float = 1.5) -> tuple[Efficiency, float]:
    """Fit efficiency curves to measurements by gradient descent (optax Adam on log-parameters).

    Args:
        rows: measurements (`read_measurements` or `moejax.planner.reference.read_reference`).
        hw: the hardware, or a mapping from each row's `hardware` name to one; the first's current curves are the
            starting point and the value of the parameters not fitted.
        options: modelling options (default: each row's `expert_mode`).
        factors: which `Efficiency` parameters to fit.
        max_iter: gradient steps.
        learning_rate: initial Adam step size (log-parameter units), decayed along a cosine to 2% of it.
        metrics: the metrics whose squared log error is minimised.
        max_fraction: cap on the fitted fractions of peak (1.0 for real accelerators; the default 1.5 leaves room
            for rough peaks such as the CPU host's).

    Returns:
        (fitted Efficiency, final mean squared log error).
    """
    import jax
    import jax.numpy as jnp
    import optax

    unknown = set(factors) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown efficiency factors {sorted(unknown)}; known {FACTORS}")
    start = (next(iter(hw.values())) if isinstance(hw, Mapping) else hw).efficiency.as_dict()
    feats = {k: jnp.asarray(v) for k, v in measurement_features(rows, hw, options).items()}
    targets = {m: jnp.asarray([r[m] for r in rows], dtype=jnp.float32) for m in metrics}
    fixed = {k: jnp.float32(v) for k, v in start.items() if k not in factors}
    x = {k: jnp.log(jnp.float32(max(min(start[k], max_fraction) if k in FRACTIONS else start[k], 1e-9)))
         for k in factors}

    def efficiency(x: dict) -> dict:
        return fixed | {k: jnp.minimum(jnp.exp(v), max_fraction) if k in FRACTIONS else jnp.exp(v)
                        for k, v in x.items()}

    def loss(x: dict):
        return log_loss(feats, targets, efficiency(x), metrics)

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max_iter, alpha=0.02))
    state = opt.init(x)

    @jax.jit
    def step(x, state):
        value, grad = jax.value_and_grad(loss)(x)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(x, updates), state, value

    for _ in range(max_iter):
        x, state, _ = step(x, state)
    fitted = {k: float(v) for k, v in efficiency(x).items()}
    return Efficiency(**(start | fitted)), float(loss(x))


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
