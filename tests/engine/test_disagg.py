"""Disaggregated serving (`Engine(decode_model, config, prefill_model=...)`): prompts prefilled on one placed model,
decoded on another over other devices, KV pages moved between them.

Tokens equal the aggregated engine's for (prefill, decode) layout pairs with different tensor sizes, both expert
modes, a pipelined decode layout, an MLA model and an fp8 KV cache; decode-side preemption (re-prefill), aborts at
every point and a non-finite row; both pools return full; the bytes moved are pages x page bytes, the planner's.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moejax
from moejax import SamplingParams, ServeConfig
from moejax.engine import disagg
from moejax.kv_cache import pages_for
from tests.engine.test_engine import _drain, _random_requests

VOCAB = 128
CONFIG = dict(max_running=8, page_size=4, num_pages=32, chunk_size=16, max_prefill_seqs=2, max_model_len=64, seed=0)

# (prefill layout, decode layout, decode expert mode): prefill devices first, decode on the next ones.
# The first pair in the default suite, the others in CI's slow step (the suite's time).
PAIRS = [("TP4", "DP2EP2", "dp_attention"),
         pytest.param("DP2", "TP2EP2", "replicated_attention", marks=pytest.mark.slow),
         pytest.param("TP2", "EP2PP2", None, marks=pytest.mark.slow)]


def _split(family_path, prefill: str, decode: str, expert_mode=None, **kw):
    """(prefill model, decode model) on disjoint devices: prefill's first."""
    devices = jax.devices()
    n = moejax.Layout.parse(prefill).size
    p = moejax.load(family_path, layout=prefill, devices=devices[:n], **kw)
    d = moejax.load(family_path, layout=decode, devices=devices[n:], **kw,
                    **({"expert_mode": expert_mode} if expert_mode else {}))
    return p, d


@pytest.fixture(scope="module")
def reference(hf_checkpoints):
    """family -> the aggregated DP1 engine's tokens for a list of requests (memoised)."""
    memo, models = {}, {}

    def run(family, reqs, **kw):
        key = (family, tuple((tuple(p), sp) for p, sp in reqs), tuple(sorted(kw.items())))
        if key not in memo:
            if (family, tuple(sorted(kw.items()))) not in models:
                models[family, tuple(sorted(kw.items()))] = moejax.load(hf_checkpoints[family][0], layout="DP1", **kw)
            engine = moejax.Engine(models[family, tuple(sorted(kw.items()))], ServeConfig(**CONFIG))
            memo[key] = engine.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        return memo[key]

    return run


def _assert_pools_full(engine):
    assert not engine.has_unfinished()
    assert engine.allocator.total_free == engine.config.num_pages * engine.groups
    assert all(r.pending == 0 and r.pages == [] for r in engine.requests.values())
    assert engine.prefill.allocator.total_free == engine.config.num_pages * engine.prefill.groups


def _requests(seed, n=10):
    return _random_requests(np.random.default_rng(seed), n, max_prompt=40, max_new=(1, 12), sampled_fraction=0.3)


@pytest.mark.parametrize("prefill,decode,mode", PAIRS)
def test_tokens_equal_aggregated_and_bytes_are_pages(hf_checkpoints, reference, prefill, decode, mode):
    p, d = _split(hf_checkpoints["mixtral"][0], prefill, decode, mode)
    engine = moejax.Engine(d, ServeConfig(**{**CONFIG, "num_pages": 128}), prefill_model=p)  # no preemption
    engine.warmup()
    reqs = _requests(1)
    ids = [engine.add_request(prompt, sp) for prompt, sp in reqs]
    _drain(engine)
    assert [engine.requests[i].output_ids for i in ids] == reference("mixtral", reqs)
    assert engine.stats.preemptions == 0
    page = disagg.page_bytes(d.steps, CONFIG["page_size"], d.dtype)
    assert page == disagg.page_bytes(p.steps, CONFIG["page_size"], p.dtype)  # layout-free: real layers and heads
    assert page == d.cfg.kv_bytes_per_token(4) * CONFIG["page_size"]  # the planner's formula (float32)
    for i, (prompt, sp) in zip(ids, reqs, strict=True):
        moved = 0 if sp.max_new_tokens == 1 else pages_for(len(prompt), CONFIG["page_size"]) * page
        assert engine.requests[i].kv_bytes_moved == moved, (i, len(prompt))
    assert engine.stats.kv_transfer_bytes == sum(engine.requests[i].kv_bytes_moved for i in ids)
    assert engine.stats.kv_transfers == sum(sp.max_new_tokens > 1 for _, sp in reqs)
    _assert_pools_full(engine)


@pytest.mark.parametrize("family,kw", [("deepseek_v3", {}),
                                       pytest.param("mixtral", {"kv_cache_dtype": "fp8"}, marks=pytest.mark.slow)])
def test_mla_and_fp8_pools_move(hf_checkpoints, reference, family, kw):
    p, d = _split(hf_checkpoints[family][0], "TP2", "DP2EP2", **kw)
    engine = moejax.Engine(d, ServeConfig(**CONFIG), prefill_model=p)
    reqs = _requests(2, 6)
    assert engine.generate([q for q, _ in reqs], [sp for _, sp in reqs]) == reference(family, reqs, **kw)
    _assert_pools_full(engine)


@pytest.fixture(scope="module")
def pair(hf_checkpoints):
    return _split(hf_checkpoints["mixtral"][0], "TP2", "DP2EP2")


def test_prefix_caching_on_the_prefill_side(pair, reference):
    """With enable_prefix_caching the prefill side serves shared prefixes from its cache (chunks skipped), every
    page of the sequence still moves, and the tokens equal the aggregated engine's; the prefill pool ends with
    its pages free or cached, nothing referenced."""
    p, d = pair
    engine = moejax.Engine(d, ServeConfig(**{**CONFIG, "enable_prefix_caching": True}), prefill_model=p)
    shared = list(range(3, 27))  # 6 full pages
    reqs = [(shared + [90 + i, 5], SamplingParams(max_new_tokens=4 + i % 3)) for i in range(6)]
    assert engine.generate([reqs[0][0]], [reqs[0][1]]) == reference("mixtral", reqs[:1])  # fills the cache
    ids = [engine.add_request(prompt, sp) for prompt, sp in reqs[1:]]
    _drain(engine)
    assert [engine.requests[i].output_ids for i in ids] == reference("mixtral", reqs[1:])
    assert engine.stats.cached_prompt_tokens >= 5 * 24
    page = disagg.page_bytes(d.steps, CONFIG["page_size"], d.dtype)
    assert all(engine.requests[i].kv_bytes_moved == pages_for(26, CONFIG["page_size"]) * page for i in ids)
    alloc = engine.prefill.allocator  # free or cached and unreferenced (evictable) counts as free
    assert sum(alloc.num_cached(g) for g in range(alloc.num_groups)) > 0
    assert all(alloc.refcount(g, page) == 0 for g in range(alloc.num_groups) for page in range(CONFIG["num_pages"]))
    _assert_pools_full(engine)


@pytest.mark.slow  # the suite's time
def test_decode_preemption_prefills_again(pair, reference):
    """A decode pool too small for the workload: the youngest decoding request is preempted, prefilled again on the
    prefill side and moved again; every request gets the aggregated engine's tokens."""
    p, d = pair
    engine = moejax.Engine(d, ServeConfig(**{**CONFIG, "num_pages": 16}), prefill_model=p)
    reqs = _random_requests(np.random.default_rng(4), 16, max_prompt=40, max_new=(16, 20), sampled_fraction=0.5)
    ids = [engine.add_request(prompt, sp) for prompt, sp in reqs]
    _drain(engine)
    assert engine.stats.preemptions > 0
    assert engine.stats.kv_transfers > sum(sp.max_new_tokens > 1 for _, sp in reqs)  # some moved twice
    assert [engine.requests[i].output_ids for i in ids] == reference("mixtral", reqs)
    _assert_pools_full(engine)


def test_abort_at_every_point(pair, reference):
    """Aborts while waiting for the prefill side, mid-prefill (a chunked prompt), finished prefilling but waiting
    for a decode slot, and decoding: each finishes "abort" with its pages free; the others are unaffected."""
    p, d = pair
    engine = moejax.Engine(d, ServeConfig(**{**CONFIG, "max_running": 4}), prefill_model=p)  # 1 decode slot per group
    long = SamplingParams(max_new_tokens=30)
    reqs = [([i + 1] * 5, long) for i in range(4)]  # fill the decode side
    reqs += [([7] * 40, SamplingParams(max_new_tokens=5)),  # prefilled in 3 chunks
             ([9, 9, 9], SamplingParams(max_new_tokens=4)), ([3] * 6, SamplingParams(max_new_tokens=4))]
    ids = [engine.add_request(prompt, sp) for prompt, sp in reqs]
    while engine.requests[ids[4]].num_computed == 0:  # the chunked prompt has started
        engine.step()
    assert engine.prefill.scheduler.holds(engine.requests[ids[4]])
    waiting_id = engine.add_request([5, 4, 3], SamplingParams(max_new_tokens=3))
    assert engine.abort(waiting_id) and engine.abort(ids[4])  # queued on the prefill side; mid-prefill
    while not engine.prefill.scheduler.ready():  # a finished prefill waiting for a decode slot
        engine.step()
    blocked = engine.prefill.scheduler.ready()[0].request_id
    decoding = next(r.request_id for r in engine.scheduler.running[0] if r.output_ids)
    assert engine.abort(blocked) and engine.abort(decoding)
    outs = _drain(engine)
    aborted = {waiting_id, ids[4], blocked, decoding}
    assert {o.request_id for o in outs if o.finish_reason == "abort"} == aborted
    expected = reference("mixtral", reqs)
    for rid, tokens in zip(ids, expected, strict=True):
        got = engine.requests[rid].output_ids
        assert got == (tokens[:len(got)] if rid in aborted else tokens), rid
    _assert_pools_full(engine)


def test_nonfinite_prefill_row_fails_only_its_request(pair, reference, monkeypatch):
    from moejax.engine.batch import SEED, packed_layout

    p, d = pair
    engine = moejax.Engine(d, ServeConfig(**CONFIG), prefill_model=p)
    real = engine.prefill._fn

    def fn(params, cache, packed, T):
        ids, cache = real(params, cache, packed, T)
        _, _, m = packed_layout(T, engine.pages_per_seq)
        return np.where(np.asarray(packed)[:, m + SEED] == 777, -1, np.asarray(ids)), cache

    monkeypatch.setattr(engine.prefill, "_fn", fn)
    bad = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=5, seed=777))
    good = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=5, seed=1))
    _drain(engine)
    assert engine.requests[bad].finish_reason == "error" and engine.requests[bad].kv_bytes_moved == 0
    assert engine.requests[good].output_ids == reference("mixtral", [([4, 5, 6], SamplingParams(max_new_tokens=5,
                                                                                                   seed=1))])[0]
    _assert_pools_full(engine)


def test_bad_pairs_are_refused(pair, hf_checkpoints):
    p, d = pair
    other = moejax.load(hf_checkpoints["qwen3_moe"][0], layout="DP1", devices=jax.devices()[6:7])
    with pytest.raises(ValueError, match="same checkpoint"):
        moejax.Engine(d, ServeConfig(**CONFIG), prefill_model=other)
    with pytest.raises(ValueError, match="async_scheduling is not supported with a prefill_model"):
        moejax.Engine(d, ServeConfig(**CONFIG, async_scheduling=True), prefill_model=p)
    fp8 = moejax.load(hf_checkpoints["mixtral"][0], layout="DP1", devices=jax.devices()[6:7], kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="KV cache format"):
        moejax.Engine(d, ServeConfig(**CONFIG), prefill_model=fp8)


def test_compiled_prefill_step_is_the_prefill_models(pair):
    """`compiled_step("prefill")` (what the sweep's HLO accounting reads) is the prefill model's program: its
    devices, not the decode model's."""
    p, d = pair
    engine = moejax.Engine(d, ServeConfig(**CONFIG), prefill_model=p)
    prefill = engine.compiled_step("prefill", CONFIG["max_prefill_seqs"])
    decode = engine.compiled_step("decode", engine.decode_buckets[-1])
    devices = lambda compiled: {dev.id for s in jax.tree.leaves(compiled.input_shardings) for dev in s.device_set}  # noqa: E731
    assert devices(prefill) == {dev.id for dev in p.mesh.devices.flat}
    assert devices(decode) == {dev.id for dev in d.mesh.devices.flat}
