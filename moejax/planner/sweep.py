"""Sweep layouts x batch x chunk, rank at a target interactivity, and extract the Pareto frontier.

`plan` is the planner's one entry point: enumerate the layouts of N devices under `Rules`, predict every
(layout, batch, chunk) with `moejax.planner.serving.predict`, and return everything in a `Plan`. Only
feasible configurations (they fit in memory) are ranked or enter the frontier.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.hardware import Hardware
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import Prediction, predict_many
from moejax.planner.workload import Options, Workload

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # per data-parallel replica
DEFAULT_CHUNKS = (256, 512, 1024, 2048, 4096, 8192)


def sweep(cfg: ModelConfig, hw: Hardware, workload: Workload, layouts: Iterable[Layout],
          options: Options | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
          chunks: Sequence[int] = DEFAULT_CHUNKS) -> list[Prediction]:
    """Predict every (layout, batch per replica, chunk) combination (one vectorised evaluation)."""
    return predict_many(cfg, [(layout, b, c) for layout in layouts for b in batches for c in chunks], hw, workload,
                        options)


def pareto_frontier(predictions: Iterable[Prediction]) -> list[Prediction]:
    """Feasible predictions not beaten on both tokens/s/device and tokens/s/user, by rising tokens/s/user."""
    ordered = sorted((p for p in predictions if p.feasible),
                     key=lambda p: (-p.tokens_per_s_per_user, -p.tokens_per_s_per_device))
    frontier, best = [], float("-inf")
    for p in ordered:
        if p.tokens_per_s_per_device > best:
            frontier.append(p)
            best = p.tokens_per_s_per_device
    return frontier[::-1]


def rank(predictions: Iterable[Prediction], target_tps_user: float = 0.0, per_layout: bool = True) -> list[Prediction]:
    """Feasible predictions with tokens/s/user >= target, best tokens/s/device first.

    Args:
        predictions: the sweep.
        target_tps_user: interactivity floor (tokens/s per user).
        per_layout: keep only each layout's best configuration.
    """
    ok = sorted((p for p in predictions if p.feasible and p.tokens_per_s_per_user >= target_tps_user),
                key=lambda p: (-p.tokens_per_s_per_device, p.ttft_s))
    if not per_layout:
        return ok
    seen, out = set(), []
    for p in ok:
        if p.layout not in seen:
            seen.add(p.layout)
            out.append(p)
    return out


@dataclass
class Plan:
    """Everything one planner run produced."""

    model: str
    hardware: str
    devices: int
    workload: Workload
    options: Options
    rules: list[str]
    layouts: list[Layout]
    rejected: list[tuple[Layout, list[str]]]
    predictions: list[Prediction]
    target_tps_user: float
    seconds: float = 0.0
    pareto: list[Prediction] = field(default_factory=list)
    ranking: list[Prediction] = field(default_factory=list)

    @property
    def count(self) -> dict[str, int]:
        feasible = sum(p.feasible for p in self.predictions)
        return {"layouts_total": len(self.layouts) + len(self.rejected), "layouts_valid": len(self.layouts),
                "configs": len(self.predictions), "configs_feasible": feasible,
                "configs_infeasible": len(self.predictions) - feasible}

    def to_json(self) -> dict:
        """The whole plan (what `moejax plan --json-full` prints and plan.json holds): rules, count, configs,
        pareto (and the context needed to read them)."""
        return {
            "model": self.model, "hardware": self.hardware, "devices": self.devices,
            "workload": vars(self.workload), "options": vars(self.options),
            "target_tps_user": self.target_tps_user,
            "rules": self.rules, "count": self.count,
            "rejected_layouts": [{"layout": str(lay), "reasons": r} for lay, r in self.rejected],
            "configs": [p.as_dict() for p in self.predictions],
            "pareto": [p.as_dict() for p in self.pareto],
            "ranking": [p.as_dict() for p in self.ranking],
        }


def plan(cfg: ModelConfig, hw: Hardware, devices: int, workload: Workload, options: Options | None = None,
         rules: Rules | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
         chunks: Sequence[int] = DEFAULT_CHUNKS, target_tps_user: float = 20.0,
         layouts: Sequence[Layout | str] | None = None) -> Plan:
    """Enumerate, predict, rank and extract the frontier for `cfg` on `devices` devices of `hw`.

    Args:
        cfg: the model.
        hw: the hardware (with the efficiency factors to use).
        devices: the device count N.
        workload: request shape and formats.
        options: modelling options.
        rules: layout rules (default: the runtime's).
        batches: concurrent requests per data-parallel replica to sweep.
        chunks: prefill chunk sizes to sweep.
        target_tps_user: interactivity floor of the ranking.
        layouts: plan only these (`Layout.parse` syntax, split ones included), rather than every layout of
            `devices`; those the rules refuse are listed as rejected, with their reasons.
    """
    start = time.perf_counter()
    options, rules = options or Options(), rules or Rules()
    layouts, rejected = enumerate_layouts(devices, cfg, rules, hw.nvlink_domain, only=layouts)
    predictions = sweep(cfg, hw, workload, layouts, options, batches, chunks)
    result = Plan(model=cfg.name or cfg.family, hardware=hw.name, devices=devices, workload=workload,
                  options=options, rules=rules.describe(hw.nvlink_domain), layouts=layouts, rejected=rejected,
                  predictions=predictions, target_tps_user=target_tps_user)
    result.pareto = pareto_frontier(predictions)
    result.ranking = rank(predictions, target_tps_user)
    result.seconds = time.perf_counter() - start
    return result
