"""A bounded soak: a few hundred requests arriving over time through the documented loop, random aborts at
random moments, a pool small enough to preempt often. Nothing may be lost, leaked or changed.

Run with -s to see the figures (requests, aborts, preemptions, pages leaked, mismatches).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from moejax import SamplingParams

VOCAB = 128
REQUESTS = 300
POOL = 16  # pages of 4 tokens per data group: a request needs up to 14
ABORT_FRACTION = 0.2


def _workload(rng):
    """A few dozen distinct (prompt, params), reused, so the alone-runs stay few; a quarter seeded-sampled."""
    distinct = []
    for i in range(24):
        prompt = rng.integers(0, VOCAB, int(rng.integers(1, 41))).tolist()
        new = int(rng.integers(2, 17))
        params = (SamplingParams(max_new_tokens=new, temperature=0.9, top_k=30, seed=i) if i % 4 == 3
                  else SamplingParams(max_new_tokens=new))
        distinct.append((prompt, params))
    return [distinct[int(k)] for k in rng.integers(0, len(distinct), REQUESTS)]


def test_soak_with_aborts_and_preemption(engine_model, engines, alone):
    engine = engines(engine_model, num_pages=POOL)
    rng = np.random.default_rng(20)
    work = _workload(rng)
    delivered = []
    engine.on_finish = delivered.append
    preemptions_before = engine.stats.preemptions
    ids, streamed, finals, abort_at, aborted = [], {}, {}, {}, set()
    try:
        step = 0
        while len(ids) < REQUESTS or engine.has_unfinished():
            for _ in range(min(int(rng.poisson(1.5)), REQUESTS - len(ids))):  # arrivals this step
                prompt, params = work[len(ids)]
                rid = len(ids) if len(ids) % 2 else None  # half with user int ids, half automatic
                ids.append(engine.add_request(prompt, params, request_id=rid))
                if rng.random() < ABORT_FRACTION:
                    abort_at.setdefault(step + int(rng.integers(0, 15)), []).append(ids[-1])
            for rid in abort_at.pop(step, []):  # waiting, prefilling, decoding or already finished
                live = not engine.requests[rid].finished
                assert engine.abort(rid) == live
                aborted |= {rid} if live else set()
            for out in engine.step():
                streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    assert out.request_id not in finals, f"{out.request_id} finished twice"
                    finals[out.request_id] = out.finish_reason
            step += 1
    finally:
        engine.on_finish = None
    preemptions = engine.stats.preemptions - preemptions_before
    leaked = POOL * engine.groups - engine.allocator.total_free
    reqs = {rid: engine.requests[rid] for rid in ids}
    mismatches = [rid for rid, (p, sp) in zip(ids, work, strict=True)
                  if rid not in aborted and reqs[rid].output_ids != alone(engine, p, sp)]
    print(f"\nsoak {engine_model.layout}: {len(ids)} requests, {len(aborted)} aborts, {preemptions} preemptions, "
          f"{step} steps, {leaked} pages leaked, {len(mismatches)} mismatches")
    assert len(set(ids)) == REQUESTS and set(finals) == set(ids)  # every accepted request ended once
    assert all(finals[rid] == ("abort" if rid in aborted else "length") for rid in ids)
    assert all(streamed.get(rid, []) == reqs[rid].output_ids for rid in ids)  # nothing lost in delivery
    assert Counter(r.request_id for r in delivered) == Counter(ids)  # on_finish saw each once
    assert leaked == 0 and not engine.scheduler.waiting and engine.scheduler.num_running == 0
    assert mismatches == []
    for rid in aborted:  # what an aborted request made before its abort is a prefix of its alone-run
        expected = alone(engine, *work[ids.index(rid)])
        assert reqs[rid].output_ids == expected[: len(reqs[rid].output_ids)], rid
    assert preemptions > 0 and len(aborted) >= REQUESTS // 10  # the soak really preempted and aborted
