"""Request lifecycle: abort delivery, id reuse and typing, automatic ids, all-or-nothing generate, and
bounded retention of finished records. Host-side behaviour: run on the data > 1 layout only.

Engines built here share the warm engine's compiled step (same model, same shapes).
"""

from __future__ import annotations

import numpy as np
import pytest

from moejax import Engine, SamplingParams
from tests.engine.conftest import NUM_PAGES, base_config


@pytest.fixture
def model(engine_model):
    if engine_model.layout.data == 1:
        pytest.skip("host-side lifecycle: one layout is enough")
    return engine_model


def _loop(engine):
    """The documented serving loop; returns every output in order."""
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def _assert_idle(engine):
    assert not engine.has_unfinished() and not engine.scheduler.waiting and engine.scheduler.num_running == 0
    assert engine.allocator.total_free == NUM_PAGES * engine.groups


def test_abort_is_delivered_by_the_documented_loop(model, engines):
    engine = engines(model)
    queued = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert engine.abort(queued) and engine.has_unfinished()  # never scheduled, but its output is owed
    assert [(o.request_id, o.finish_reason, o.finished) for o in _loop(engine)] == [(queued, "abort", True)]
    running = engine.add_request([4, 5], SamplingParams(max_new_tokens=20))
    engine.step()
    engine.step()
    assert engine.requests[running].num_output >= 1 and engine.abort(running)
    outs = _loop(engine)
    assert [(o.request_id, o.finish_reason) for o in outs] == [(running, "abort")]
    assert not engine.abort(running) and not engine.abort("never-added")  # nothing live: no-op
    _assert_idle(engine)


def test_reused_id_streams_only_its_own_outputs(model, engines, alone):
    engine = engines(model)
    prompt, params = [7, 1, 9, 4], SamplingParams(max_new_tokens=5)
    expected = alone(engine, prompt, params)
    engine.add_request([3, 3, 3], SamplingParams(max_new_tokens=9), request_id="x")
    engine.step()
    engine.abort("x")  # its abort output is still undelivered when "x" is reused
    outs = list(engine.stream(prompt, params, request_id="x"))
    assert [t for o in outs for t in o.new_token_ids] == expected
    assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
    assert engine.requests["x"].output_ids == expected  # the new record replaced the aborted one
    again = engine.add_request([5], SamplingParams(max_new_tokens=2), request_id="x")  # a finished id
    _loop(engine)
    assert again == "x" and len(engine.requests["x"].output_ids) == 2
    _assert_idle(engine)


def test_ids_are_kept_and_compared_as_given(model, engines):
    engine = engines(model)
    five = engine.add_request([1, 2], SamplingParams(max_new_tokens=8), request_id=5)
    seven = engine.add_request([3, 4], SamplingParams(max_new_tokens=8), request_id=np.int64(7))
    named = engine.add_request([5, 6], SamplingParams(max_new_tokens=8), request_id="5")
    assert (five, seven, named) == (5, 7, "5") and type(seven) is int
    with pytest.raises(ValueError, match="request id 7 is already running"):
        engine.add_request([1], SamplingParams(), request_id=7)
    engine.step()
    assert engine.abort(5) and engine.abort(np.int64(7))
    assert engine.requests["5"].finished is False  # "5" is another request
    outs = _loop(engine)
    reasons = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert reasons == {5: "abort", 7: "abort", "5": "length"}
    _assert_idle(engine)


@pytest.mark.parametrize(("request_id", "message"), [
    (1.5, r"request_id must be a str or an int, got 1.5 \(float\)"),
    (True, r"request_id must be a str or an int, got True \(bool\)"),
    (("a",), r"request_id must be a str or an int, got \('a',\) \(tuple\)"),
    (b"r1", r"request_id must be a str or an int, got b'r1' \(bytes\)"),
])
def test_bad_request_id(model, engines, request_id, message):
    engine = engines(model)
    with pytest.raises(ValueError, match=message):
        engine.add_request([1, 2], SamplingParams(), request_id=request_id)
    _assert_idle(engine)


def test_automatic_ids_skip_user_ids(model):
    engine = Engine(model, base_config(model))
    users = [engine.add_request([1], SamplingParams(max_new_tokens=2), request_id=f"req-{i}") for i in (0, 2)]
    autos = [engine.add_request([2], SamplingParams(max_new_tokens=2)) for _ in range(3)]
    assert users == ["req-0", "req-2"] and autos == ["req-1", "req-3", "req-4"]
    engine.add_request([3], SamplingParams(max_new_tokens=1), request_id="req-5")
    _loop(engine)
    assert engine.requests["req-5"].finished  # retained: its id is skipped too
    assert engine.add_request([3], SamplingParams(max_new_tokens=1)) == "req-6"
    _loop(engine)
    _assert_idle(engine)


@pytest.mark.parametrize(("prompts", "params", "message"), [
    ([[1, 2], [1, 500]], SamplingParams(), "prompt 1: Token id 500 is out of vocabulary"),
    ([[1, 2], []], SamplingParams(), "prompt 1: prompt cannot be empty"),
    ([[1], [2]], [SamplingParams(), SamplingParams(max_new_tokens=0)], "prompt 1: max_new_tokens must be at least 1"),
    ([[1], [2]], [SamplingParams(), "greedy"], "prompt 1: params must be a SamplingParams, got str"),
    ([[1], [2.5]], SamplingParams(), "prompt 1: prompt must be a 1-D sequence of integer token ids"),
    ([[1], [2]], [SamplingParams()], "got 1 SamplingParams for 2 prompts"),
    (7, SamplingParams(), "prompts must be a list of prompts .*, got 7"),
])
def test_generate_accepts_all_prompts_or_none(model, engines, prompts, params, message):
    engine = engines(model)
    before = dict(engine.requests)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, params)
    assert engine.requests == before
    _assert_idle(engine)


def test_finished_records_are_bounded_and_metrics_kept(model, alone, engines):
    finished = []
    engine = Engine(model, base_config(model, max_finished_retained=2), on_finish=finished.append)
    prompts = [[i, i + 1, i + 2] for i in range(1, 6)]
    params = SamplingParams(max_new_tokens=3)
    got = engine.generate(prompts, params)  # returns what it needs before records go
    assert got == [alone(engines(model), p, params) for p in prompts]
    assert len(finished) == 5
    assert {tuple(r.output_ids) for r in finished} == {tuple(g) for g in got}
    assert all(r.finish_reason == "length" and r.ttft_s > 0 for r in finished)
    assert len(engine.requests) == 2 and all(engine.requests[r.request_id] is r for r in finished[-2:])
    rid = engine.add_request([9], SamplingParams(max_new_tokens=4))
    engine.step()
    engine.abort(rid)
    assert engine.requests[rid].finished  # kept until its abort output is delivered
    _loop(engine)
    assert finished[-1].request_id == rid and finished[-1].finish_reason == "abort"
    assert rid in engine.requests and len(engine.requests) == 2
    _assert_idle(engine)


def test_release_on_delivery(model):
    engine = Engine(model, base_config(model, max_finished_retained=0))
    outs = list(engine.stream([1, 2, 3], SamplingParams(max_new_tokens=3), request_id="only"))
    assert [o.finished for o in outs] == [False, False, True] and engine.requests == {}
    _assert_idle(engine)


def test_stream_checks_its_input_when_called(model, engines):
    engine = engines(model)
    with pytest.raises(ValueError, match="prompt cannot be empty"):
        engine.stream([], SamplingParams())  # raises before any iteration
    _assert_idle(engine)


def test_stream_ends_when_another_caller_took_its_last_output(model, engines):
    engine = engines(model)
    outputs = engine.stream([1, 2], SamplingParams(max_new_tokens=2))
    first = next(outputs)
    engine.step()  # this caller receives the stream's final output
    assert not first.finished and list(outputs) == []
    _assert_idle(engine)
