"""Host-side policy: page allocator, FCFS admission, token budget, youngest-first preemption; sampler filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import SamplingParams
from moejax.engine.sampling import sample
from moejax.engine.scheduler import Request, Scheduler
from moejax.kv_cache import PageAllocator, pages_for


def test_allocator_takes_all_or_nothing_and_rejects_double_free():
    alloc = PageAllocator(2, 4)
    a = alloc.allocate(0, 3)
    assert sorted(a) == [0, 1, 2] and alloc.num_free(0) == 1 and alloc.num_free(1) == 4
    assert alloc.allocate(0, 2) is None and alloc.num_free(0) == 1
    alloc.free(0, a)
    assert alloc.total_free == 8
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(0, [0])
    assert pages_for(8, 4) == 2 and pages_for(9, 4) == 3


def _req(order, prompt_len, max_new=4, max_pages=None):
    table = None if max_pages is None else np.zeros(max_pages, np.int32)
    return Request(f"r{order}", order, prompt_len, list(range(prompt_len)), SamplingParams(max_new_tokens=max_new), 0,
                   page_table=table)


def _execute(plan):
    """Pretend the device ran the plan: KV computed, sampling works append a token."""
    for w in plan.works:
        w.req.num_computed += w.num
        if w.samples:
            w.req.tokens.append(0)


def test_chunks_rows_and_fcfs_admission():
    sched = Scheduler(PageAllocator(1, 100), page_size=4, slots_per_group=2, chunk_size=10, max_prefill_seqs=2)
    reqs = [_req(i, n) for i, n in enumerate([7, 9, 3])]
    for r in reversed(reqs):
        sched.add(r)
    plan = sched.schedule()
    assert [(w.req.order, w.num, w.samples) for w in plan.prefill[0]] == [(0, 7, True), (1, 9, True)]
    assert sched.waiting == [reqs[2]]  # no free slot: waits although a row is free next step
    _execute(plan)
    plan = sched.schedule()
    assert [(w.req.order, w.num) for w in plan.decode[0]] == [(0, 1), (1, 1)] and not plan.prefill[0]
    sched.remove(reqs[0])
    plan = sched.schedule()
    assert [(w.req.order, w.start, w.num, w.samples) for w in plan.prefill[0]] == [(2, 0, 3, True)]


def test_head_of_queue_is_not_overtaken():
    sched = Scheduler(PageAllocator(1, 4), page_size=4, slots_per_group=4, chunk_size=16, max_prefill_seqs=4)
    sched.add(_req(0, 12))  # 3 pages
    _execute(sched.schedule())
    sched.add(_req(1, 8))  # 2 pages: only 1 free
    sched.add(_req(2, 2))  # would fit, but must not overtake r1
    plan = sched.schedule()
    assert [w.req.order for w in plan.works] == [0] and [r.order for r in sched.waiting] == [1, 2]


def test_preemption_frees_the_youngest_and_everyone_finishes():
    alloc = PageAllocator(1, 6)
    sched = Scheduler(alloc, page_size=2, slots_per_group=3, chunk_size=8, max_prefill_seqs=3)
    reqs = [_req(i, 3, max_new=6, max_pages=5) for i in range(3)]  # 9 tokens = 5 pages each; 6 in the pool
    for r in reqs:
        sched.add(r)
    preempted = []
    for _ in range(200):
        if not sched.has_work():
            break
        plan = sched.schedule()
        preempted += [r.order for r in plan.preempted]
        for r in reqs:  # the engine copies page_table rows as is: it must track pages through grow and preempt
            if r.group >= 0 or r.pages:
                assert r.page_table.tolist() == r.pages + [0] * (5 - len(r.pages))
        _execute(plan)
        for r in reqs:
            if r.group >= 0 and r.num_output >= r.params.max_new_tokens:
                sched.remove(r)
                r.finished = True
    assert all(r.finished for r in reqs) and alloc.total_free == 6
    assert all(r.page_table.tolist() == [0] * 5 for r in reqs)
    assert preempted and preempted[0] == 2  # the youngest goes first
    assert sched.num_preemptions == len(preempted)


def test_sampler_filters_and_greedy():
    V, B = 16, 256
    logits = jnp.asarray(np.tile(np.linspace(3.0, 0.0, V, dtype=np.float32), (B, 1)))
    seeds = jnp.arange(B, dtype=jnp.uint32)
    zeros_i, ones_f = jnp.zeros(B, jnp.int32), jnp.ones(B, jnp.float32)
    run = jax.jit(sample)
    assert (np.asarray(run(logits, 0 * ones_f, zeros_i, ones_f, seeds, zeros_i)) == 0).all()  # greedy
    free = np.asarray(run(logits, ones_f, zeros_i, ones_f, seeds, zeros_i))
    assert len(set(free.tolist())) > 5  # the draw has power
    top3 = np.asarray(run(logits, ones_f, zeros_i + 3, ones_f, seeds, zeros_i))
    assert set(top3.tolist()) == {0, 1, 2}
    probs = np.exp(np.linspace(3.0, 0.0, V)) / np.exp(np.linspace(3.0, 0.0, V)).sum()
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.5)) + 1  # smallest prefix with mass >= 0.5
    topp = np.asarray(run(logits, ones_f, zeros_i, ones_f * 0.5, seeds, zeros_i))
    assert set(topp.tolist()) == set(range(nucleus))
    again = np.asarray(run(logits, ones_f, zeros_i, ones_f, seeds, zeros_i))
    later = np.asarray(run(logits, ones_f, zeros_i, ones_f, seeds, zeros_i + 1))
    assert (again == free).all() and (later != free).any()  # keyed on (seed, counter)


def test_packed_sampling_row_round_trips_through_int32():
    from moejax.engine.batch import SEED, TEMPERATURE, TOP_K, TOP_P, sampling_row

    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    row = jnp.asarray(sampling_row(params, 2**32 - 3))
    seed, temp, top_p = (jax.lax.bitcast_convert_type(row[i - TOP_K], t) for i, t in
                         ((SEED, jnp.uint32), (TEMPERATURE, jnp.float32), (TOP_P, jnp.float32)))
    assert int(row[0]) == 5 and int(seed) == 2**32 - 3
    assert float(temp) == np.float32(0.7) and float(top_p) == np.float32(0.9)
