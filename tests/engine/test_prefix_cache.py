"""Prefix caching in the engine: requests sharing prompt prefixes get the tokens they get without the cache (greedy
and seeded sampling) while their cached pages skip prefill chunks, under preemption and aborts of requests that
share pages; nothing leaks (every page ends free or cached, every reference count 0), and the pages of a request
with non-finite logits are never served. The allocator's own rules are tested on the host in test_scheduler.py."""

from __future__ import annotations

import numpy as np
import pytest

from moejax import Engine, Model, SamplingParams, ServeConfig
from tests.engine.conftest import PAGE_SIZE, base_config

VOCAB = 128


def _assert_clean(engine):
    """Idle, every page free or cached and unreferenced."""
    alloc = engine.allocator
    assert not engine.has_unfinished() and alloc.total_free == engine.config.num_pages * engine.groups
    assert all(alloc.refcount(g, p) == 0 for g in range(engine.groups) for p in range(engine.config.num_pages))


def _cached_pages(engine) -> int:
    return sum(engine.allocator.num_cached(g) for g in range(engine.groups))


def _shared_prefix_requests(rng, prefixes, n, sampled_fraction=0.3, max_new=(3, 8)):
    """n (prompt, params): a random prefix of `prefixes` and a random suffix (possibly empty)."""
    out = []
    for _ in range(n):
        prefix = prefixes[int(rng.integers(len(prefixes)))]
        prompt = prefix + rng.integers(0, VOCAB, int(rng.integers(0, 9))).tolist()
        new = int(rng.integers(*max_new))
        params = (SamplingParams(max_new_tokens=new, temperature=0.9, top_k=30, seed=int(rng.integers(1000)))
                  if rng.random() < sampled_fraction else SamplingParams(max_new_tokens=new))
        out.append((prompt, params))
    return out


def test_config_flag_is_checked():
    assert ServeConfig().enable_prefix_caching is False
    assert ServeConfig(enable_prefix_caching=np.bool_(True)).enable_prefix_caching is True
    with pytest.raises(ValueError, match=r"ServeConfig.enable_prefix_caching must be a bool \(True or False\), got 1"):
        ServeConfig(enable_prefix_caching=1)


def test_shared_prefixes_give_the_uncached_tokens(engine_model, engines, alone):
    plain, engine = engines(engine_model), engines(engine_model, enable_prefix_caching=True)
    rng = np.random.default_rng(31)
    prefixes = [rng.integers(0, VOCAB, n).tolist() for n in (13, 22)]  # page boundaries inside and after them
    requests = _shared_prefix_requests(rng, prefixes, 14)
    expected = [alone(plain, p, sp) for p, sp in requests]
    before = (engine.stats.prompt_tokens, engine.stats.cached_prompt_tokens, engine.stats.prefill_tokens)
    ids = [engine.add_request(p, sp) for p, sp in requests[:2]]  # the first two fill the cache
    while engine.has_unfinished():
        engine.step()
        if len(ids) < len(requests):  # the others arrive one per step, joining a busy engine
            ids.append(engine.add_request(*requests[len(ids)]))
    assert [engine.requests[i].output_ids for i in ids] == expected
    prompt, cached, prefill = (after - b for after, b in zip(
        (engine.stats.prompt_tokens, engine.stats.cached_prompt_tokens, engine.stats.prefill_tokens), before,
        strict=True))
    assert prompt == sum(len(p) for p, _ in requests)  # nothing preempted: each prompt admitted once
    assert cached >= 4 * PAGE_SIZE and cached % PAGE_SIZE == 0
    assert prompt - len(requests) <= prefill + cached <= prompt  # a prompt's last token may go in the decode call
    _assert_clean(engine)
    assert _cached_pages(engine) > 0


def test_aborting_requests_that_share_pages(engine_model, engines, alone):
    plain, engine = engines(engine_model), engines(engine_model, enable_prefix_caching=True)
    alloc = engine.allocator
    rng = np.random.default_rng(5)
    prefix = rng.integers(0, VOCAB, 14).tolist()  # 3 full pages and a half
    a, b, c, d = (prefix + rng.integers(0, VOCAB, k).tolist() for k in (2, 3, 1, 5))
    params = SamplingParams(max_new_tokens=8)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    engine.generate([a], params)  # caches the prefix's pages
    cached_before = engine.stats.cached_prompt_tokens
    rb, rc = engine.add_request(b, params), engine.add_request(c, sampled)
    engine.step()
    reqs = engine.requests[rb], engine.requests[rc]
    shared = reqs[0].pages[:3]
    assert reqs[0].group == reqs[1].group and reqs[1].pages[:3] == shared  # both read the cached prefix
    assert engine.stats.cached_prompt_tokens - cached_before == 2 * 3 * PAGE_SIZE
    g = reqs[0].group
    assert [alloc.refcount(g, p) for p in shared] == [2, 2, 2]
    for _ in range(3):
        engine.step()
    assert engine.abort(rb)  # decoding (or its work in flight)
    assert [alloc.refcount(g, p) for p in shared] == [1, 1, 1] and all(alloc.is_cached(g, p) for p in shared)
    rd = engine.add_request(d, params)
    engine.step()
    assert engine.requests[rd].pages[:3] == shared and engine.abort(rd)  # just admitted: its prefill in flight
    while engine.has_unfinished():
        engine.step()
    assert engine.requests[rc].output_ids == alone(plain, c, sampled)
    assert engine.generate([b, d], params) == [alone(plain, b, params), alone(plain, d, params)]
    _assert_clean(engine)


def test_soak_with_preemption_and_aborts(engine_model, engines, alone):
    """A hundred-odd requests over three prefixes arriving over time, a fifth aborted at a random moment, a pool
    small enough to preempt: the tokens of the uncached engine, prefixes served, nothing leaked (-s prints the
    figures)."""
    plain, engine = engines(engine_model), engines(engine_model, num_pages=16, enable_prefix_caching=True)
    rng = np.random.default_rng(7)
    prefixes = [rng.integers(0, VOCAB, n).tolist() for n in (9, 18, 27)]
    distinct = _shared_prefix_requests(rng, prefixes, 12, sampled_fraction=0.25, max_new=(2, 12))
    which = rng.integers(0, len(distinct), 120).tolist()
    work = [distinct[k] for k in which]
    expected = {i: alone(plain, p, sp) for i, (p, sp) in enumerate(distinct)}
    stats0 = (engine.stats.preemptions, engine.stats.cached_prompt_tokens, engine.stats.prompt_tokens)
    ids, abort_at, aborted, step = [], {}, set(), 0
    while len(ids) < len(work) or engine.has_unfinished():
        for _ in range(min(int(rng.poisson(1.5)), len(work) - len(ids))):
            ids.append(engine.add_request(*work[len(ids)]))
            if rng.random() < 0.2:
                abort_at.setdefault(step + int(rng.integers(0, 12)), []).append(ids[-1])
        for rid in abort_at.pop(step, []):
            if engine.abort(rid):
                aborted.add(rid)
        engine.step()
        step += 1
    for rid, k in zip(ids, which, strict=True):
        out = engine.requests[rid].output_ids
        assert out == (expected[k][:len(out)] if rid in aborted else expected[k]), rid
    preemptions, cached, prompt = (now - then for now, then in zip(
        (engine.stats.preemptions, engine.stats.cached_prompt_tokens, engine.stats.prompt_tokens), stats0, strict=True))
    print(f"\nprefix-cache soak {engine_model.layout}: {len(ids)} requests, {len(aborted)} aborts, {preemptions} "
          f"preemptions, {cached} of {prompt} admitted tokens served from the cache")
    assert preemptions > 0 and cached > 0
    assert len(aborted) >= 10
    _assert_clean(engine)


def test_nonfinite_request_pages_are_never_served(engine_model, hf_checkpoints):
    """A request whose token after a shared prefix is poisoned (its embedding row NaN) fails and caches nothing;
    later, it is served only the pages a clean request cached before the poison, and fails again."""
    if engine_model.layout.data == 1:
        pytest.skip("host-side rule: one layout is enough (the engine compiles a poisoned model)")
    from moejax.checkpoint.hf import HFSource
    from tests.engine.test_isolation import PoisonedSource

    poison = VOCAB - 1
    source = PoisonedSource(HFSource(hf_checkpoints["mixtral"][0]), poison)
    engine = Engine(Model(source.cfg, source, layout=engine_model.layout),
                    base_config(engine_model, enable_prefix_caching=True))
    registered, register = [], engine.scheduler.register
    engine.scheduler.register = lambda req, upto=None: (registered.append(req.request_id), register(req, upto))
    rng = np.random.default_rng(3)
    suffix = rng.integers(0, 96, 9).tolist()
    clean = rng.integers(0, 96, 10).tolist() + suffix  # 19 tokens: at most 4 pages served
    bad = clean[:10] + [poison] + suffix  # 20 tokens, the NaN in page 2: a clean request shares pages 0 and 1
    params = SamplingParams(max_new_tokens=5)

    def run(*prompts):
        ids = [engine.add_request(p, params, request_id=f"{name}-{len(registered)}-{i}")
               for i, (name, p) in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        return [engine.requests[i] for i in ids]

    (first,) = run(("bad", bad))
    assert first.finish_reason == "error" and _cached_pages(engine) == 0
    (alone_clean,) = run(("clean", clean))  # from scratch: nothing was cached
    assert engine.stats.cached_prompt_tokens == 0 and _cached_pages(engine) > 0
    again = run(("bad", bad), ("clean", clean))
    assert [r.finish_reason for r in again] == ["error", "length"] and engine.stats.nonfinite == 2
    assert again[1].output_ids == alone_clean.output_ids
    assert engine.stats.cached_prompt_tokens == 2 * PAGE_SIZE + 4 * PAGE_SIZE  # bad: pages 0-1 only; clean: 4
    assert not any(rid.startswith("bad") for rid in registered)
    _assert_clean(engine)
