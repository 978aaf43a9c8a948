"""Asynchronous scheduling (`ServeConfig(async_scheduling=True)`): the host schedules and packs step t + 1 while
the device runs step t, the tokens of step t fed to step t + 1 on device. Outputs equal the synchronous engine's
(greedy and seeded, stops, preemption, aborts, prefix caching, a non-finite row), one step later.

Each test leaves its engine idle so later tests can reuse the compiled, warm engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from moejax import Engine, SamplingParams, ServeConfig
from tests.engine.conftest import base_config
from tests.engine.test_engine import _assert_idle, _drain, check_preempted_requests_match_alone

VOCAB = 128


@pytest.fixture
def overrides(engine_model):
    """Async scheduling on this layout: a pipelined one takes it with one microbatch (the sequential schedule)."""
    return {"async_scheduling": True} | ({"microbatches": 1} if engine_model.layout.stage > 1 else {})


def test_config_is_checked(engine_model):
    with pytest.raises(ValueError, match="async_scheduling must be a bool"):
        ServeConfig(async_scheduling=1)
    with pytest.raises(ValueError, match="do not combine"):
        ServeConfig(async_scheduling=True, decode_steps=4)
    if engine_model.layout.stage > 1:
        with pytest.raises(ValueError, match="pipelined microbatches"):
            Engine(engine_model, base_config(engine_model, async_scheduling=True))


def test_tokens_equal_synchronous_one_step_later(engine_model, engines, alone, overrides):
    sync, fed = engines(engine_model), engines(engine_model, **overrides)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, int(n)).tolist() for n in (5, 17, 9, 30, 3, 12, 40)]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 7, 1, 3, 8)]
    params += [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=30, top_p=0.9, seed=7),
               SamplingParams(max_new_tokens=11, temperature=0.7, seed=8)]
    expected = [alone(sync, p, sp) for p, sp in zip(prompts, params, strict=True)]
    # Stop tokens: after the first output (greedy) and mid-stream (sampled).
    params[1] = SamplingParams(max_new_tokens=7, stop_token_ids=(expected[1][1], VOCAB - 1))
    expected[1] = expected[1][: expected[1].index(expected[1][1]) + 1]
    params[5] = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=30, top_p=0.9, seed=7,
                               stop_token_ids=(expected[5][4],))
    expected[5] = expected[5][: expected[5].index(expected[5][4]) + 1]
    rid = fed.add_request(prompts[0], params[0])
    assert fed.step() == []  # its prefill dispatched, its token not read yet
    first = fed.step()  # the prefill's token, read while the first decode runs
    assert [o.new_token_ids for o in first] == [expected[0][:1]] and fed.requests[rid].pending == 1
    _drain(fed)
    assert fed.requests[rid].output_ids == expected[0] and fed.requests[rid].pending == 0
    assert fed.generate(prompts, params) == expected
    reasons = [r.finish_reason for r in list(fed.requests.values())[-len(prompts):]]
    assert reasons == ["length", "stop", "length", "length", "length", "stop", "length"]
    _assert_idle(fed)


def test_stream_yields_every_token_once(engine_model, engines, alone, overrides):
    fed = engines(engine_model, **overrides)
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    outs = list(fed.stream([7, 7, 1, 2], params))
    assert [t for o in outs for t in o.new_token_ids] == alone(engines(engine_model), [7, 7, 1, 2], params)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    _assert_idle(fed)


def test_preemption_matches_alone(engine_model, engines, alone, overrides):
    engine = engines(engine_model, num_pages=16, **overrides)
    reference = engines(engine_model, num_pages=16)
    rng_seed = 6
    check_preempted_requests_match_alone(engine, lambda _e, p, sp: alone(reference, p, sp),
                                         np.random.default_rng(rng_seed), 8, (16, 20), 0.5, 3)


def test_abort_with_work_in_flight(engine_model, engines, alone, overrides):
    """An abort between steps (the request's next token already dispatched) drops that work; its pages are free
    at once and the others are unaffected."""
    fed = engines(engine_model, **overrides)
    p1, p2, params = [1, 2, 3, 4, 5], [6, 7, 8], SamplingParams(max_new_tokens=12)
    a, b = fed.add_request(p1, params), fed.add_request(p2, params)
    while len(fed.requests[a].output_ids) < 3:
        fed.step()
    assert fed.requests[a].pending == 1  # its next token is on the device
    assert fed.abort(a)
    assert fed.requests[a].pending == 0 and fed.requests[a].pages == []
    outs = _drain(fed)
    assert [o.finish_reason for o in outs if o.request_id == a] == ["abort"]
    assert all(not o.new_token_ids for o in outs if o.request_id == a)
    assert fed.requests[a].output_ids == alone(engines(engine_model), p1, params)[:len(fed.requests[a].output_ids)]
    assert fed.requests[b].output_ids == alone(engines(engine_model), p2, params)
    _assert_idle(fed)


def test_prefix_caching_matches(engine_model, engines, alone, overrides):
    fed = engines(engine_model, enable_prefix_caching=True, **overrides)
    shared = list(range(3, 3 + 21))
    prompts = [shared + [90 + i, 5] for i in range(6)]
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=5, temperature=0.9, seed=4)] * 3
    expected = [alone(engines(engine_model), p, sp) for p, sp in zip(prompts, params, strict=True)]
    before = fed.stats.cached_prompt_tokens
    assert fed.generate(prompts[:1], params[:1]) == expected[:1]  # fills the cache
    assert fed.generate(prompts[1:], params[1:]) == expected[1:]
    assert fed.stats.cached_prompt_tokens > before
    _assert_idle(fed)


def test_nonfinite_row_fails_only_its_request(engine_model, engines, monkeypatch, overrides):
    """A row whose id comes back non-finite fails its request when the host reads it (its next step, already
    dispatched on a fed token, is dropped); its neighbour is unaffected."""
    from moejax.engine.batch import SEED, packed_layout

    fed = engines(engine_model, **overrides)
    real, calls = fed._fed, []

    def fn(params, cache, feed, packed, T, offset):
        ids, cache, feed = real(params, cache, feed, packed, T, offset)
        _, _, m = packed_layout(T, fed.pages_per_seq)
        if T == 1:
            calls.append(1)
            if len(calls) == 3:  # the request's third decode
                ids = np.where(np.asarray(packed)[:, m + SEED] == 4321, -1, np.asarray(ids))
        return ids, cache, feed

    monkeypatch.setattr(fed, "_fed", fn)
    rid = fed.add_request([1, 2, 3], SamplingParams(max_new_tokens=9, seed=4321))
    other = fed.add_request([4, 5, 6], SamplingParams(max_new_tokens=9, seed=1))
    before = fed.stats.nonfinite
    outs = _drain(fed)
    mine = [o for o in outs if o.request_id == rid]
    assert [len(o.new_token_ids) for o in mine] == [1, 1, 1, 0] and mine[-1].finish_reason == "error"
    assert "(output position 3)" in mine[-1].error and fed.stats.nonfinite == before + 1
    assert len(fed.requests[rid].output_ids) == 3
    assert fed.requests[other].finish_reason == "length" and len(fed.requests[other].output_ids) == 9
    _assert_idle(fed)
