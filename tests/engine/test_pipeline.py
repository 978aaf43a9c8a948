"""Pipeline parallelism: microbatch groups in flight through the stages at once (the engine's ticks,
the scheduler's groups, the compiled tick's program)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import moejax
from moejax import SamplingParams
from moejax.engine.scheduler import Request, Scheduler
from moejax.kv_cache import PageAllocator
from tests import hf_models

VOCAB = 128
# PP2 runs 3 + 2 layers and PP4 2 + 1 + 1 + 1 (uneven stages); the expert modes differ in EP4PP2.
# EP4PP2 runs in CI's slow step (TP2EP2PP2 holds the expert group's data groups in flight in the default suite).
LAYOUTS = ["PP2", "PP4", "TP2EP2PP2", "DP2PP4", pytest.param("EP4PP2", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "mixtral5"
    hf_models.build("mixtral", path, num_hidden_layers=5)
    return path


def _config(**kw):
    base = dict(max_running=8, page_size=4, num_pages=48, chunk_size=8, max_prefill_seqs=2, max_model_len=64, seed=0)
    return moejax.ServeConfig(**{**base, **kw})


def _workload(seed=0, n=12, max_prompt=20):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, int(rng.integers(3, max_prompt))).tolist() for _ in range(n)]
    return prompts, [SamplingParams(max_new_tokens=int(rng.integers(4, 10))) for _ in range(n)]


def _run(engine, prompts, params, max_steps=2000):
    """All requests at once; returns (tokens per request, most microbatch groups holding requests at once)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    groups = 0
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        engine.step()
        groups = max(groups, sum(n > 0 for n in engine.occupancy()))
    else:
        raise AssertionError(f"not finished after {max_steps} steps: {engine.stats}")
    assert engine.allocator.total_free == engine.config.num_pages * engine.groups  # every page back
    return [engine.requests[i].output_ids for i in ids], groups


@pytest.fixture(scope="module")
def reference(five_layers):
    prompts, params = _workload()
    tokens, _ = _run(moejax.Engine(moejax.load(five_layers, layout="DP1"), _config()), prompts, params)
    return prompts, params, tokens


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipelined_greedy_tokens_equal_one_device(five_layers, reference, layout):
    prompts, params, expected = reference
    model = moejax.load(five_layers, layout=layout)
    stages = model.layout.stage
    engine = moejax.Engine(model, _config(decode_buckets=(8 // (model.batch_shards * stages),)))
    assert engine.microbatches == stages  # the default: one group per stage
    tokens, groups = _run(engine, prompts, params)
    assert tokens == expected
    assert groups == stages  # every group held requests at once: the stages worked on different ones
    assert engine.stats.decode_calls > 0 and engine.stats.prefill_calls > 0


def test_a_small_pool_preempts_across_groups_and_still_finishes(five_layers):
    """12 pages per data group on 4 stages: a group's request must take pages other groups hold, also
    from requests whose work is in flight (dropped on return). Taking only requests not in flight
    livelocked here: each group could only preempt itself, and no prefill ever finished."""
    prompts, params = _workload(seed=5, n=10, max_prompt=31)
    expected, _ = _run(moejax.Engine(moejax.load(five_layers, layout="DP1"), _config()), prompts, params)
    engine = moejax.Engine(moejax.load(five_layers, layout="PP4"), _config(num_pages=12, max_model_len=48))
    tokens, _ = _run(engine, prompts, params)
    assert tokens == expected and engine.stats.preemptions > 0


@pytest.fixture(scope="module")
def pp2(five_layers):
    return moejax.load(five_layers, layout="TP2EP2PP2")


@pytest.mark.parametrize("microbatches", [1, pytest.param(3, marks=pytest.mark.slow), 4])  # 3: CI's slow step
def test_fewer_or_more_groups_than_stages(pp2, reference, microbatches):
    """1 group: the sequential schedule (one call through every stage); 3 and 4 on 2 stages: groups wait
    for their turn. Tokens are the same."""
    prompts, params, expected = reference
    engine = moejax.Engine(pp2, _config(max_running=12 if microbatches == 3 else 8, microbatches=microbatches))
    tokens, groups = _run(engine, prompts, params)
    assert tokens == expected and groups == microbatches
    assert (engine._pipes is None) == (microbatches == 1)


def test_abort_while_in_flight_drops_the_work_and_spares_the_others(pp2, reference):
    prompts, params, expected = reference
    engine = moejax.Engine(pp2, _config())
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    victim = None
    for _ in range(200):
        outs = engine.step()
        if victim is None:
            flying = [i for i in ids if engine.requests[i].in_flight and engine.requests[i].num_output > 0]
            if flying:
                victim = flying[0]
                made = list(engine.requests[victim].output_ids)
                assert engine.abort(victim)
        else:
            assert all(o.request_id != victim or o.finish_reason == "abort" for o in outs)
        if not engine.has_unfinished():
            break
    assert victim is not None and engine.requests[victim].output_ids == made  # nothing after the abort
    for rid, want in zip(ids, expected, strict=True):
        if rid != victim:
            assert engine.requests[rid].output_ids == want, rid
    assert engine.allocator.total_free == engine.config.num_pages * engine.groups


def test_each_stage_runs_its_layers_once_and_sends_one_activation(five_layers, pp2):
    """The compiled tick: no stage's layers twice (the same matmuls as the one-stage program) and one
    collective-permute per step, of the microbatch's activations [rows, T, D], as the planner counts it."""
    from moejax.bench import comm
    from moejax.planner.hardware import load_hardware

    dots = {}
    for name, model in (("pp", pp2), ("flat", moejax.load(five_layers, layout="TP2EP2"))):
        engine = moejax.Engine(model, _config(microbatches=2 if name == "pp" else None, decode_buckets=(4,)))
        text = engine.compiled_step("decode", 4).as_text()
        dots[name] = len(re.findall(r"= \S+ dot\(", text))
        if name == "pp":
            permutes = re.findall(r"= (\S+) collective-permute(?:-start)?\(", text)
            assert len(permutes) == 1, permutes
            assert re.sub(r"\{.*", "", permutes[0]) == "f32[4,1,48]", permutes  # 4 rows x 1 token x hidden 48
            sent = comm.account(engine)["decode"]["by_kind"]["collective-permute"]["wire_bytes"]
            plan = comm.planner_volume(model.cfg, model.layout, "dp_attention", 4, 4, load_hardware("cpu-host"),
                                       pipelined=True)
            assert sent == plan["send"] == 4 * 48 * 4
    assert dots["pp"] == dots["flat"] > 0, dots


# ---- the scheduler's microbatch groups (host only) ---------------------------------------------------


def _req(order, prompt_len, max_new=4):
    return Request(f"r{order}", order, prompt_len, list(range(prompt_len)), SamplingParams(max_new_tokens=max_new), 0)


def test_requests_join_the_group_being_scheduled_up_to_its_slots():
    sched = Scheduler(PageAllocator(1, 100), page_size=4, slots_per_group=2, chunk_size=16, max_prefill_seqs=4,
                      microbatches=2)
    reqs = [_req(i, 5) for i in range(5)]
    for r in reqs:
        sched.add(r)
    assert [w.req.order for w in sched.schedule(0).prefill[0]] == [0, 1]  # group 0 full at 2
    assert [w.req.order for w in sched.schedule(1).prefill[0]] == [2, 3]
    assert [r.microbatch for r in reqs[:4]] == [0, 0, 1, 1] and sched.occupancy() == [2, 2]
    # group 0's turn again (its work not run here, so it is scheduled again): no room for r4, which waits
    assert [w.req.order for w in sched.schedule(0).prefill[0]] == [0, 1] and sched.waiting == [reqs[4]]


def test_in_flight_requests_are_skipped_but_preempted_when_youngest():
    sched = Scheduler(PageAllocator(1, 4), page_size=4, slots_per_group=4, chunk_size=16, max_prefill_seqs=4,
                      microbatches=2)
    old, young = _req(0, 8), _req(1, 8)
    for r in (old, young):
        sched.add(r)
    plan = sched.schedule(0)  # both admitted into group 0: 2 pages each, the pool is full
    assert [w.req for w in plan.prefill[0]] == [old, young] and {w.epoch for w in plan.works} == {0}
    for w in plan.works:
        w.req.num_computed += w.num
        w.req.tokens.append(0)  # 9 tokens: the next one needs a third page
    young.in_flight = True
    plan = sched.schedule(0)
    # `young` is skipped (in flight) but, the youngest, gives its pages to `old`: the oldest progresses;
    # its work in flight is of epoch 0, and it is now at epoch 1 (the engine drops the stale work)
    assert plan.preempted == [young] and not young.in_flight and young.num_preemptions == 1
    assert [w.req for w in plan.decode[0]] == [old] and young.group == -1 and sched.waiting == [young]
