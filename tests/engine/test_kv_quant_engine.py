"""The serving engine with a quantized KV cache: a request's tokens are the same alone as in a busy batch and
after preemption (its pages recomputed), as with the float cache. A token's stored bytes (values and scale) depend
on that token alone, so these hold exactly.

fp8 on the tiny Mixtral's two engine layouts (tests/engine/conftest.py: DP2TP2EP2, and TP2EP2PP2 with pipelined
microbatches), int8 on DeepSeek-V3 DP2EP2 in the dp_attention mode (one MLA latent pool, its pages split over data x
expert).
"""

from __future__ import annotations

import numpy as np
import pytest

from moejax import kv_cache
from tests.engine.test_engine import check_busy_matches_alone, check_preempted_requests_match_alone


@pytest.fixture(scope="module")
def mla_model(hf_checkpoints):
    import moejax

    return moejax.load(hf_checkpoints["deepseek_v3"][0], layout="DP2EP2", expert_mode="dp_attention")


def _check_pools(engine, kv):
    assert engine.kv_cache_dtype == kv
    assert all(isinstance(p, kv_cache.QuantizedPool) and p.values.dtype == kv_cache.STORAGE[kv] for p in engine.cache)


def test_fp8_cache_busy_matches_alone(engine_model, engines, alone):
    engine = engines(engine_model, kv_cache_dtype="fp8")
    _check_pools(engine, "fp8")
    check_busy_matches_alone(engine, alone, np.random.default_rng(41), 10, 12, (3, 7))


def test_fp8_cache_preempted_requests_match_alone(engine_model, engines, alone):
    check_preempted_requests_match_alone(engines(engine_model, kv_cache_dtype="fp8", num_pages=16), alone,
                                         np.random.default_rng(42), 6, (16, 20), 0.25, 2)


@pytest.mark.parametrize("check", ["busy", pytest.param("preempted", marks=pytest.mark.slow)])  # preempted: slow step
def test_int8_mla_cache_matches_alone(mla_model, engines, alone, check):
    if check == "busy":
        engine = engines(mla_model, kv_cache_dtype="int8")
        _check_pools(engine, "int8")
        check_busy_matches_alone(engine, alone, np.random.default_rng(43), 10, 10, (3, 7))
    else:
        check_preempted_requests_match_alone(engines(mla_model, kv_cache_dtype="int8", num_pages=16), alone,
                                             np.random.default_rng(44), 6, (14, 20), 0.25, 2)

