"""Sweep fixtures: the tiny Mixtral (tiny-moe, random weights), a short greedy workload, and placed models
shared by every sweep in the session (a layout's compiled steps are reused when its shapes repeat)."""

from __future__ import annotations

import pytest

from moejax.bench.workload import Lengths, Workload
from moejax.mesh import Layout

MODEL = "tiny-moe"
SUBSET = ("DP2TP2EP2", "TP2EP2PP2", "EP8")  # data, tensor, expert and stage, in the default suite
WORKLOAD = Workload(input_len=Lengths(4, 12), output_len=Lengths(4), num_requests=8, warmup_requests=0, seed=3)


def spec_for(layouts, **overrides):
    from moejax.bench.sweep import SweepSpec

    kw = dict(model=MODEL, layouts=tuple(Layout.parse(x) for x in layouts), chunk_sizes=(16,), max_running=(8,),
              workload=WORKLOAD, hardware="cpu-host", decode_buckets="max", reference_layout=Layout.parse("DP1"))
    kw.update(overrides)
    return SweepSpec(**kw)


@pytest.fixture(scope="session")
def sweep_models():
    """Placed models by (model, layout, mode, dtype, seed), shared by the session's sweeps."""
    return {}


@pytest.fixture(scope="session")
def subset_sweep(sweep_models, tmp_path_factory):
    """The default-suite sweep: DP1 (the reference) and SUBSET, one configuration each."""
    from moejax.bench.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    spec = spec_for(SUBSET)
    return spec, out, run_sweep(spec, out, progress=False, models=sweep_models, log=lambda line: None)
