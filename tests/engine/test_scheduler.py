"""Host-side policy: page allocator and prefix cache, FCFS admission, token budget, youngest-first preemption;
sampler filters."""

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


def test_prefix_cache_keys_are_exact_chains():
    alloc = PageAllocator(2, 4)
    a, b = alloc.allocate(0, 2)
    ea = alloc.register(0, alloc.ROOT, (1, 2), a)
    eb = alloc.register(0, ea, (3, 4), b)
    assert alloc.match(0, [(1, 2), (3, 4), (5, 6)]) == [(ea, a), (eb, b)]
    assert alloc.match(0, [(3, 4)]) == []  # the same tokens under another parent: another key
    assert alloc.match(0, [(1, 2), (3, 5)]) == [(ea, a)] and alloc.match(1, [(1, 2)]) == []  # per data group
    (c,) = alloc.allocate(0, 1)
    assert alloc.register(0, alloc.ROOT, (1, 2), c) == ea and not alloc.is_cached(0, c)  # known tokens: one entry
    assert alloc.num_cached(0) == 2 and alloc.num_free(0) == 1
    with pytest.raises(RuntimeError, match="already cached"):
        alloc.register(0, ea, (7, 7), b)
    alloc.free(0, [c])
    with pytest.raises(RuntimeError, match="not held"):
        alloc.register(0, ea, (7, 7), c)


def test_prefix_cache_refcounts_and_lru_eviction():
    alloc = PageAllocator(1, 4)
    pages = alloc.allocate(0, 3)
    parent = alloc.ROOT
    for i, page in enumerate(pages):
        parent = alloc.register(0, parent, (i,), page)
    alloc.share(0, pages[:2])  # a second request takes the first two pages by reference
    assert [alloc.refcount(0, p) for p in pages] == [2, 2, 1] and alloc.num_free(0) == 1
    alloc.free(0, pages)  # the first request ends: its third page becomes evictable, the others are still read
    assert [alloc.refcount(0, p) for p in pages] == [1, 1, 0] and alloc.num_free(0) == 2
    alloc.free(0, pages[:2])  # walked backwards: the chain's tail goes first, then page 1, then page 0
    assert alloc.num_free(0) == 4 and alloc.num_cached(0) == 3
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(0, [pages[0]])
    alloc.share(0, [pages[2]])  # a hit takes the page out of the eviction order
    assert alloc.allocate(0, 4) is None and alloc.num_free(0) == 3  # all or nothing; a held page is never taken
    first = alloc.allocate(0, 2)  # the free page, then the least recently released cached page (pages[1])
    assert first == [3, pages[1]] and not alloc.is_cached(0, pages[1]) and alloc.refcount(0, pages[1]) == 1
    assert alloc.match(0, [(0,), (1,), (2,)]) == [(1, pages[0])]  # pages[2]'s parent key is gone: unreachable
    assert alloc.allocate(0, 1) == [pages[0]] and alloc.num_cached(0) == 1 and alloc.num_free(0) == 0
    alloc.free(0, [pages[2]])
    assert alloc.allocate(0, 1) == [pages[2]] and alloc.num_cached(0) == 0  # finally evicted too


def _cached_scheduler(num_pages, page_size=4, chunk_size=8, groups=1, slots=4):
    alloc = PageAllocator(groups, num_pages)
    return alloc, Scheduler(alloc, page_size=page_size, slots_per_group=slots, chunk_size=chunk_size,
                            max_prefill_seqs=4, prefix_caching=True)


def _run(sched, reqs, on_plan=lambda plan: None):
    """Drive `reqs` to completion in the engine's commit order: computed, token (7), register, finish."""
    for r in reqs:
        sched.add(r)
    for _ in range(500):
        if not sched.has_work():
            return
        plan = sched.schedule()
        on_plan(plan)
        for w in plan.works:
            w.req.num_computed += w.num
            if w.samples:
                w.req.tokens.append(7)
                sched.register(w.req)
                if w.req.num_output >= w.req.params.max_new_tokens:
                    sched.remove(w.req)
                    w.req.finished = True
    raise AssertionError("did not finish")


def test_admission_takes_the_cached_prefix_but_computes_a_token():
    alloc, sched = _cached_scheduler(16)
    _run(sched, [_req(0, 10, max_new=3)])  # 0..9 then 7 7 7: pages registered as tokens are sampled, 3 full ones
    assert alloc.num_cached(0) == 3 and alloc.num_free(0) == 16
    second = _req(1, 12, max_new=1, max_pages=4)  # 0..11: two pages match; the third differs (8 9 10 11 / 8 9 7 7)
    sched.add(second)
    plan = sched.schedule()
    (work,) = plan.admitted
    assert (work.start, work.num, second.num_computed) == (8, 4, 8) and plan.prefill[0] == [work]
    hits = [page for _, page in alloc.match(0, [(0, 1, 2, 3), (4, 5, 6, 7)])]
    assert second.pages[:2] == hits and second.page_table.tolist()[:3] == second.pages
    assert [alloc.refcount(0, p) for p in second.pages] == [1, 1, 1]
    sched.remove(second)
    third = _req(2, 8, max_new=1)  # two whole cached pages, but at most (8 - 1) // 4 = 1 may be served
    sched.add(third)
    (work,) = sched.schedule().admitted
    assert (work.start, work.num, work.samples) == (4, 4, True)
    sched.remove(third)
    assert all(alloc.refcount(0, p) == 0 for p in range(16)) and alloc.num_free(0) == 16


def test_admission_prefers_the_group_with_the_longest_prefix():
    alloc, sched = _cached_scheduler(8, groups=2)
    _run(sched, [_req(0, 9, max_new=1), _req(1, 5, max_new=1)])  # r0 in group 0, r1 in group 1 (fewest running)
    assert alloc.num_cached(0) == 2 and alloc.num_cached(1) == 1
    busy = _req(9, 1)  # makes group 0 the busier one (in flight: never scheduled here)
    busy.group, busy.microbatch, busy.in_flight = 0, 0, True
    sched.running[0].append(busy)
    longer = _req(2, 12, max_new=1)
    sched.add(longer)
    (work,) = sched.schedule().admitted
    assert (longer.group, work.start) == (0, 8)  # two cached pages in group 0, one in group 1
    sched.remove(longer)
    shorter = _req(3, 6, max_new=1)  # one servable page, held by both groups: the usual rule (fewest running)
    sched.add(shorter)
    (work,) = sched.schedule().admitted
    assert (shorter.group, work.start) == (1, 4)
    sched.remove(shorter)


def test_preempted_requests_take_back_their_cached_pages():
    alloc, sched = _cached_scheduler(6, page_size=2, slots=3)
    reqs = [_req(i, 3, max_new=6, max_pages=5) for i in range(3)]  # 9 tokens = 5 pages each; page (0, 1) shared
    readmitted = []

    def check(plan):
        readmitted.extend(w.start for w in plan.admitted if w.req.num_preemptions)
        held = {}
        for r in reqs:
            if r.group >= 0:
                assert r.page_table.tolist() == r.pages + [0] * (5 - len(r.pages))
                for p in r.pages:
                    held[p] = held.get(p, 0) + 1
        assert all(alloc.refcount(0, p) == held.get(p, 0) for p in range(6))  # a reference per running holder

    _run(sched, reqs, check)
    assert all(r.finished for r in reqs) and sched.num_preemptions > 0 and any(readmitted)
    assert alloc.num_free(0) == 6 and all(alloc.refcount(0, p) == 0 for p in range(6))


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
