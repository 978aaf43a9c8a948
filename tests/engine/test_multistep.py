"""Multi-step decode (`ServeConfig(decode_steps=K)`): K decode steps in one compiled call give exactly the
tokens of K single steps (greedy and seeded), stop mid-call as single steps would, step singly while a request
joins, and keep preemption and numerical isolation working.

Each test leaves its engine idle so later tests can reuse the compiled, warm engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from moejax import SamplingParams, ServeConfig
from tests.engine.test_engine import _assert_idle, _drain, check_preempted_requests_match_alone

K = 4
VOCAB = 128


@pytest.fixture
def model(engine_model):
    if engine_model.layout.stage > 1:
        pytest.skip("pipelined microbatches step singly; DP2TP2EP2 covers the multi-step call")
    return engine_model


def test_decode_steps_is_checked():
    with pytest.raises(ValueError, match="decode_steps"):
        ServeConfig(decode_steps=0)
    with pytest.raises(ValueError, match="decode_steps"):
        ServeConfig(decode_steps=True)
    assert ServeConfig(decode_steps=np.int64(4)).decode_steps == 4


def test_tokens_equal_single_steps_and_stop_mid_call(model, engines, alone):
    single, multi = engines(model), engines(model, decode_steps=K)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, int(n)).tolist() for n in (5, 17, 9, 30, 3, 12)]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 7, 9, 3)]  # not multiples of K
    params += [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=30, top_p=0.9, seed=7),
               SamplingParams(max_new_tokens=11, temperature=0.7, seed=8)]
    expected = [alone(single, p, sp) for p, sp in zip(prompts, params, strict=True)]
    # Stop tokens hit mid-call (outputs 2 and 5 of greedy and sampled requests).
    params[1] = SamplingParams(max_new_tokens=7, stop_token_ids=(expected[1][2], VOCAB - 1))
    expected[1] = expected[1][: expected[1].index(expected[1][2]) + 1]
    params[4] = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=30, top_p=0.9, seed=7,
                               stop_token_ids=(expected[4][5],))
    expected[4] = expected[4][: expected[4].index(expected[4][5]) + 1]
    before = multi.stats.multistep_calls
    assert multi.generate(prompts, params) == expected
    assert multi.stats.multistep_calls > before
    reasons = [r.finish_reason for r in list(multi.requests.values())[-len(prompts):]]
    assert reasons == ["length", "stop", "length", "length", "stop", "length"]
    _assert_idle(multi)


def test_joining_request_forces_single_steps(model, engines, alone):
    engine = engines(model, decode_steps=K)
    first, second = ([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=20)), ([9] * 13, SamplingParams(max_new_tokens=6))
    rid = engine.add_request(*first)
    outs = engine.step() + engine.step()  # prefill (1 token), then a K-step call
    assert [len(o.new_token_ids) for o in outs] == [1, K]
    calls = engine.stats.multistep_calls
    other = engine.add_request(*second)
    joined = engine.step()  # its prefill runs next to a single decode step
    assert sorted(len(o.new_token_ids) for o in joined) == [1, 1] and engine.stats.multistep_calls == calls
    _drain(engine)
    assert engine.stats.multistep_calls > calls  # both decoding: K steps again
    assert engine.requests[rid].output_ids == alone(engines(model), *first)
    assert engine.requests[other].output_ids == alone(engines(model), *second)
    _assert_idle(engine)


def test_preemption_still_matches_alone(model, engines, alone):
    engine = engines(model, num_pages=16, decode_steps=K)
    check_preempted_requests_match_alone(engine, alone, np.random.default_rng(4), 8, (16, 20), 0.5, 3)
    assert engine.stats.multistep_calls > 0


def test_nonfinite_step_mid_call_fails_only_its_request(model, engines, monkeypatch):
    """A row marked non-finite (-1) at its 3rd step of a call finishes with "error" there (its earlier tokens
    kept, later ones discarded); its neighbour is unaffected."""
    from moejax.engine.batch import SEED, packed_layout

    engine = engines(model, decode_steps=K)
    real = engine._multistep
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=9, seed=12345))
    other = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=9, seed=1))
    target, before = engine.requests[rid], engine.stats.nonfinite

    def fn(params, cache, packed, limits, k):
        ids, cache = real(params, cache, packed, limits, k)
        ids = np.asarray(ids).copy()
        _, _, m = packed_layout(1, engine.pages_per_seq)
        ids[packed[:, m + SEED] == 12345, 2] = -1
        return ids, cache

    monkeypatch.setattr(engine, "_multistep", fn)
    outs = _drain(engine)
    mine = [o for o in outs if o.request_id == rid]
    assert [len(o.new_token_ids) for o in mine] == [1, 2] and mine[-1].finish_reason == "error"
    assert target.output_ids == mine[0].new_token_ids + mine[1].new_token_ids
    assert "(output position 3)" in mine[-1].error and engine.stats.nonfinite == before + 1
    assert engine.requests[other].finish_reason == "length" and len(engine.requests[other].output_ids) == 9
    _assert_idle(engine)


def test_sequential_stages_run_multistep(engine_model, engines, alone):
    """With stages and one microbatch (the sequential schedule) the K-step call takes every stage in turn."""
    if engine_model.layout.stage == 1:
        pytest.skip("a stage > 1 layout")
    engine = engines(engine_model, microbatches=1, decode_steps=K)
    prompts, params = [[3, 1, 4, 1, 5], [9, 2, 6] * 5], SamplingParams(max_new_tokens=7)
    assert engine.generate(prompts, params) == [alone(engines(engine_model), p, params) for p in prompts]
    assert engine.stats.multistep_calls > 0
    _assert_idle(engine)
