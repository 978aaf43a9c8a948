"""Layout planner: predict every (DP, TP, EP, PP) layout of N devices from first principles, no devices needed.

    from moejax.planner import Workload, load_hardware, plan
    result = plan(load_model_config("gpt-moe-1800b"), load_hardware("gb200-nvl72"), 64, Workload(precision="fp4"))

Modules, read in order: `workload` (what is served, arrivals, modelling options), `hardware` (peaks, links,
efficiency curves), `layout` (attention and MoE split apart; the runtime's layouts as special cases), `memory`
(parameter counts, bytes per device), `cost` (one stage, one microbatch, per operation class), `serving`
(pipeline schedule, in-flight batching, queueing -> TTFT, TPOT, tokens/s; NumPy or jax.numpy), `rules` (which
layouts), `sweep` (plan, rank, Pareto), `report` (table, CSV, plot), `calibrate` (measured vs predicted, curves
fitted with optax), `reference` and `compare` (aiconfigurator reference table and the comparison), `cli`.
Every assumption is stated in those docstrings and in docs/planner.md.
"""

from moejax.planner.calibrate import fit_efficiency, prediction_errors, read_measurements, save_efficiency
from moejax.planner.hardware import Efficiency, Hardware, load_hardware
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import memory_fit, param_counts
from moejax.planner.report import format_summary, write_outputs
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import Prediction, predict, predict_many
from moejax.planner.sweep import Plan, pareto_frontier, plan, rank
from moejax.planner.workload import Options, Workload

__all__ = [
    "Efficiency", "Hardware", "Options", "Plan", "PlanLayout", "Prediction", "Rules", "Workload", "enumerate_layouts",
    "fit_efficiency", "format_summary", "load_hardware", "memory_fit", "param_counts", "pareto_frontier", "plan",
    "predict", "predict_many", "prediction_errors", "rank", "read_measurements", "save_efficiency", "write_outputs",
]
