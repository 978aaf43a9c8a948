"""Layout planner: predict every (DP, TP, EP, PP) layout of N devices from first principles, no devices needed.

    from moejax.planner import Workload, load_hardware, plan
    result = plan(load_model_config("gpt-moe-1800b"), load_hardware("gb200-nvl72"), 64, Workload(precision="fp4"))

Modules, read in order: `workload` (what is served, modelling options), `hardware` (peaks, links,
efficiency factors), `memory` (parameter counts, bytes per device), `cost` (one stage, one microbatch),
`serving` (in-flight batching -> TTFT, TPOT, tokens/s), `rules` (which layouts), `sweep` (plan, rank,
Pareto), `report` (table, CSV, plot), `calibrate` (measured vs predicted, fitted efficiency), `cli`.
Every assumption is stated in those docstrings and in docs/planner.md.
"""

from moejax.planner.calibrate import fit_efficiency, prediction_errors, read_measurements, save_efficiency
from moejax.planner.hardware import Efficiency, Hardware, load_hardware
from moejax.planner.memory import memory_fit, param_counts
from moejax.planner.report import format_summary, write_outputs
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import Prediction, predict
from moejax.planner.sweep import Plan, pareto_frontier, plan, rank
from moejax.planner.workload import Options, Workload

__all__ = [
    "Efficiency", "Hardware", "Options", "Plan", "Prediction", "Rules", "Workload", "enumerate_layouts",
    "fit_efficiency", "format_summary", "load_hardware", "memory_fit", "param_counts", "pareto_frontier", "plan",
    "predict", "prediction_errors", "rank", "read_measurements", "save_efficiency", "write_outputs",
]
