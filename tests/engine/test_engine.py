"""Serving-engine semantics on two 8-device layouts (data > 1 and stage > 1), float32, tiny Mixtral.

Each test leaves its engine idle so later tests can reuse the compiled, warm engine.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moejax import Engine, SamplingParams
from tests import hf_models
from tests.engine.conftest import PAGE_SIZE, base_config

VOCAB = 128


def _random_requests(rng, n, max_prompt=40, max_new=(4, 12), sampled_fraction=0.0):
    reqs = []
    for _ in range(n):
        prompt = rng.integers(0, VOCAB, int(rng.integers(1, max_prompt + 1))).tolist()
        new = int(rng.integers(max_new[0], max_new[1] + 1))
        if rng.random() < sampled_fraction:
            params = SamplingParams(max_new_tokens=new, temperature=0.8, top_k=20, top_p=0.9,
                                    seed=int(rng.integers(1000)))
        else:
            params = SamplingParams(max_new_tokens=new)
        reqs.append((prompt, params))
    return reqs


def _drain(engine, max_steps=10_000):
    outputs = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs += engine.step()
    raise AssertionError("engine did not finish its work")


def _assert_idle(engine):
    assert not engine.has_unfinished()
    assert engine.allocator.total_free == engine.config.num_pages * engine.groups


def check_busy_matches_alone(engine, alone, rng, needle_new: int, others: int, steps: tuple[int, int]):
    """A request joining a busy engine (`others` requests, a quarter sampled, after `steps` random steps) gets the
    tokens it gets alone, and so does every other request. Returns (the needle's prompt, its tokens)."""
    needle_prompt, needle_params = rng.integers(0, VOCAB, 23).tolist(), SamplingParams(max_new_tokens=needle_new)
    expected = alone(engine, needle_prompt, needle_params)
    requests = _random_requests(rng, others, sampled_fraction=0.25)
    mixed_before = engine.stats.mixed_steps
    ids = [engine.add_request(p, sp) for p, sp in requests]
    for _ in range(int(rng.integers(*steps))):
        engine.step()
    assert engine.scheduler.num_running > 1  # it really joins a busy engine
    if engine.pipelined:  # stage > 1: microbatch groups in flight through the stages at once
        assert engine.microbatches > 1 and min(engine.occupancy()) > 0
    needle = engine.add_request(needle_prompt, needle_params)
    _drain(engine)
    assert engine.requests[needle].output_ids == expected
    assert engine.stats.mixed_steps > mixed_before  # prefill chunks and decodes ran in the same steps
    for rid, (p, sp) in zip(ids, requests, strict=True):
        assert engine.requests[rid].output_ids == alone(engine, p, sp), rid
    _assert_idle(engine)
    return needle_prompt, expected


def test_request_joining_busy_engine_matches_alone(engine_model, engines, alone):
    check_busy_matches_alone(engines(engine_model), alone, np.random.default_rng(1), 10, 16, (3, 9))


@pytest.mark.parametrize("chunk", [1, 7, 30])
def test_chunk_sizes_give_identical_tokens(engine_model, engines, alone, chunk):
    # chunk 7 with page size 4: chunk boundaries (7, 14, 21, 28) fall inside pages; 30 = the whole prompt.
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, 13).tolist()]
    params = SamplingParams(max_new_tokens=8)
    reference = [alone(engines(engine_model), p, params) for p in prompts]  # chunk 16
    assert engines(engine_model, chunk_size=chunk).generate(prompts, params) == reference


def test_greedy_matches_hf_generate(engine_model, engines):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 17, 30)]
    new = 16
    got = engines(engine_model).generate(prompts, SamplingParams(max_new_tokens=new))
    want = [hf_models.hf_greedy(engine_model.torch_reference, p, new) for p in prompts]
    assert got == want


def check_preempted_requests_match_alone(engine, alone, rng, per_group: int, max_new: tuple[int, int],
                                         sampled_fraction: float, pool_multiple: int):
    """A workload of `per_group` requests per data group needing at least `pool_multiple` times the pool completes,
    with preemptions, every request with the tokens it gets alone."""
    reqs = _random_requests(rng, per_group * engine.groups, max_prompt=40, max_new=max_new,
                            sampled_fraction=sampled_fraction)
    demand = sum(-(-(len(p) + sp.max_new_tokens) // PAGE_SIZE) for p, sp in reqs)
    assert demand >= pool_multiple * engine.config.num_pages * engine.groups
    before = engine.stats.preemptions
    ids = [engine.add_request(p, sp) for p, sp in reqs]
    _drain(engine)
    assert engine.stats.preemptions > before
    assert sum(engine.requests[i].num_preemptions for i in ids) == engine.stats.preemptions - before
    for rid, (p, sp) in zip(ids, reqs, strict=True):
        req = engine.requests[rid]
        assert req.finished and req.finish_reason == "length"
        assert req.output_ids == alone(engine, p, sp), rid
    _assert_idle(engine)


def test_workload_three_times_the_pool_completes_with_preemption(engine_model, engines, alone):
    # 16 pages of 4 tokens per data group: a request needs up to 15, so two running ones can collide.
    check_preempted_requests_match_alone(engines(engine_model, num_pages=16), alone, np.random.default_rng(4), 8,
                                         (16, 20), 0.5, 3)


def test_abort_during_prefill_and_decode_returns_pages(engine_model, engines, alone):
    engine = engines(engine_model)
    rng = np.random.default_rng(5)
    keep_prompt, keep_params = rng.integers(0, VOCAB, 9).tolist(), SamplingParams(max_new_tokens=12)
    expected = alone(engine, keep_prompt, keep_params)
    short_id = engine.add_request(rng.integers(0, VOCAB, 6).tolist(), SamplingParams(max_new_tokens=12))
    long_id = engine.add_request(rng.integers(0, VOCAB, 50).tolist(), SamplingParams(max_new_tokens=4))
    keep_id = engine.add_request(keep_prompt, keep_params)
    engine.step()
    engine.step()
    long_req, short_req = engine.requests[long_id], engine.requests[short_id]
    assert 0 < long_req.num_computed < 50 and short_req.num_output >= 1  # mid-prefill; decoding
    for req in (long_req, short_req):
        free, held = engine.allocator.total_free, len(req.pages)
        assert held > 0
        engine.abort(req.request_id)
        assert engine.allocator.total_free == free + held and req.pages == []
    outputs = engine.step()
    aborted = {o.request_id: o for o in outputs if o.finish_reason == "abort"}
    assert set(aborted) == {long_id, short_id} and all(o.finished for o in aborted.values())
    _drain(engine)
    assert engine.requests[keep_id].output_ids == expected
    _assert_idle(engine)


def test_seeded_sampling_is_position_independent(engine_model, engines, alone):
    engine = engines(engine_model)
    rng = np.random.default_rng(6)
    prompt = rng.integers(0, VOCAB, 11).tolist()
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_k=k, top_p=p, seed=s)
              for s, k, p in [(7, 0, 1.0), (8, 0, 1.0), (7, 50, 0.9)]]
    alone_out = [alone(engine, prompt, sp) for sp in params]
    assert alone_out[0] != alone_out[1]  # different seeds differ
    # The same (prompt, seed) at other rows, among other requests, started at other moments.
    filler = _random_requests(rng, 6, sampled_fraction=0.5)
    for p, sp in filler[:3]:
        engine.add_request(p, sp)
    engine.step()
    ids = [engine.add_request(prompt, sp) for sp in params[::-1]]
    for p, sp in filler[3:]:
        engine.add_request(p, sp)
    _drain(engine)
    assert [engine.requests[i].output_ids for i in ids[::-1]] == alone_out
    greedy = alone(engine, prompt, SamplingParams(max_new_tokens=12))
    assert alone_out[0] != greedy


def test_stop_tokens_and_length(engine_model, engines, alone):
    engine = engines(engine_model)
    prompt = list(range(3, 20))
    full = alone(engine, prompt, SamplingParams(max_new_tokens=10))
    stop = full[4]
    cut = full.index(stop) + 1
    outs = list(engine.stream(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,))))
    assert [o.new_token_ids[0] for o in outs] == full[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and not any(o.finished for o in outs[:-1])
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=3))
    _drain(engine)
    req = engine.requests[rid]
    assert req.output_ids == full[:3] and req.finish_reason == "length"
    assert len(req.token_times_s) == 3 and req.ttft_s > 0 and req.tpot_s > 0
    assert req.arrival_s < req.token_times_s[0] <= req.token_times_s[1] <= req.token_times_s[2]


def test_no_compilation_after_warmup(engine_model, engines):
    engine = engines(engine_model)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(7)
        ids = [engine.add_request(p, sp) for p, sp in _random_requests(rng, 50, sampled_fraction=0.3)]
        for _ in range(5):
            engine.step()
        engine.abort(ids[-1])
        _drain(engine)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert all(engine.requests[i].finished for i in ids)
    _assert_idle(engine)


BAD = [
    ([], {}, "prompt cannot be empty"),
    ([1, 128], {}, "Token id 128 is out of vocabulary"),
    ([-1], {}, "Token id -1 is out of vocabulary"),
    (list(range(60)), {"max_new_tokens": 5}, r"60 tokens \+ max_new_tokens 5 = 65 exceeds the context limit"),
    ([1], {"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
    ([1], {"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ([1], {"temperature": float("nan")}, "got nan"),
    ([1], {"top_p": 0.0}, r"top_p must lie in \(0, 1\], got 0.0"),
    ([1], {"top_p": 1.5}, "got 1.5"),
    ([1], {"stop_token_ids": (500,)}, "stop token id 500 is out of vocabulary"),
]


def test_bad_input_is_rejected_and_engine_keeps_serving(engine_model, engines, alone):
    if engine_model.layout.data == 1:
        pytest.skip("host-side checks: one layout is enough")
    engine = engines(engine_model)
    prompt, params = [4, 8, 15, 16, 23, 42], SamplingParams(max_new_tokens=8)
    expected = alone(engine, prompt, params)
    live = engine.add_request(prompt, params, request_id="live")
    engine.step()
    for bad_prompt, kw, message in BAD:
        with pytest.raises(ValueError, match=message):
            engine.add_request(bad_prompt, SamplingParams(**kw))
    with pytest.raises(ValueError, match="'live' is already running"):
        engine.add_request([1, 2], SamplingParams(), request_id="live")
    small = Engine(engine_model, base_config(engine_model, num_pages=8))  # 8 pages = 32 tokens per group
    with pytest.raises(ValueError, match="needs 9 KV pages .* has 8 pages"):
        small.add_request(list(range(30)), SamplingParams(max_new_tokens=5))
    _drain(engine)
    assert engine.requests[live].output_ids == expected
    assert engine.add_request([1, 2], SamplingParams(max_new_tokens=1), request_id="live") == "live"  # reusable
    _drain(engine)
    _assert_idle(engine)
