"""Engine fixtures: the tiny Mixtral placed on two 8-device layouts (data > 1, stage > 1), engines
that share one compiled step per shape, and a cache of "run alone" reference outputs."""

from __future__ import annotations

import pytest

LAYOUTS = ["DP2TP2EP2", "TP2EP2PP2"]
MAX_LEN = 64  # prompt + new tokens; 16 pages of 4
PAGE_SIZE = 4
NUM_PAGES = 32  # per data group: small, so busy workloads preempt


# Tests whose pipelined case runs in CI's slow step (the default suite runs them on DP2TP2EP2, and the pipeline's
# own invariants, preemption across microbatch groups included, in test_pipeline.py): the suite's time.
SLOW_ON_PIPELINED = {"test_soak_with_aborts_and_preemption",
                     "test_workload_three_times_the_pool_completes_with_preemption"}


# Modules whose every pipelined case runs in the slow step: asynchronous scheduling takes a pipelined layout with one
# microbatch, the sequential schedule the default suite covers with multi-step decode; the engine's, the KV-format,
# prefix-cache and config checks on the pipelined layout (the pipeline's own invariants stay in the default suite:
# test_pipeline.py, test_isolation.py, test_lifecycle.py, test_multistep.py). The suite's time: ~60 s, 2026-12-06.
SLOW_PIPELINED_MODULES = ("test_async.py", "test_engine.py", "test_kv_quant_engine.py", "test_prefix_cache.py",
                          "test_config_validation.py")
# Single cases run in the slow step for the suite's time (each family and pairing keeps a lighter case in the
# default suite).
SLOW_CASES = ("test_disagg.py::test_mla_and_fp8_pools_move[deepseek_v3-kw0]",
              "test_families_engine.py::test_request_joining_busy_engine_matches_alone[deepseek_v3-TP2MTP1EP4]")


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        pipelined = "[TP2EP2PP2" in item.nodeid
        if item.nodeid.endswith(SLOW_CASES) or pipelined and (
                getattr(item, "originalname", None) in SLOW_ON_PIPELINED
                or item.nodeid.split("::")[0].endswith(SLOW_PIPELINED_MODULES)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", params=LAYOUTS)
def engine_model(request, hf_checkpoints):
    import moejax

    path, torch_model = hf_checkpoints["mixtral"]
    model = moejax.load(path, layout=request.param)
    model.torch_reference = torch_model
    return model


def base_config(model, **overrides):
    import moejax

    slots = 8 // model.batch_shards
    kw = dict(max_running=8, page_size=PAGE_SIZE, num_pages=NUM_PAGES, chunk_size=16, max_prefill_seqs=2,
              max_model_len=MAX_LEN, decode_buckets=(slots,), seed=0)
    kw.update(overrides)
    return moejax.ServeConfig(**kw)


@pytest.fixture(scope="session")
def engines():
    """(model, **config overrides) -> a warm Engine, reused across tests (they must leave it idle)."""
    import moejax

    cache = {}

    def get(model, **overrides):
        key = (id(model), tuple(sorted(overrides.items())))
        if key not in cache:
            engine = moejax.Engine(model, base_config(model, **overrides))
            engine.warmup()
            cache[key] = engine
        engine = cache[key]
        assert not engine.has_unfinished()
        return engine

    return get


@pytest.fixture(scope="session")
def alone():
    """(engine, prompt, params) -> the request's tokens when it runs alone in the engine (memoised)."""
    memo = {}

    def run(engine, prompt, params):
        key = (id(engine.model), engine.kv_cache_dtype, tuple(prompt), params)
        if key not in memo:
            assert not engine.has_unfinished()
            memo[key] = (engine.model, engine.generate([list(prompt)], params)[0])  # the model kept: its id stays its
        return memo[key][1]

    return run
