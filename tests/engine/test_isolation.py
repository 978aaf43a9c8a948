"""Numerical isolation: a request whose activations turn NaN (a poisoned embedding row, hit by its own
token) finishes with "error" and changes no other request's tokens, now or after its pages are reused."""

from __future__ import annotations

import numpy as np
import pytest

from moejax import Engine, Model, SamplingParams
from moejax.checkpoint.hf import HFSource
from tests.engine.conftest import NUM_PAGES, base_config

VOCAB = 128


class PoisonedSource:
    """A weight source whose embedding row `token` is NaN; every other weight as in `source`."""

    def __init__(self, source, token: int):
        self.source, self.token, self.cfg = source, token, source.cfg

    def read(self, name, layer, index):
        block = self.source.read(name, layer, index)
        rows = range(*index[0].indices(self.cfg.vocab_size)) if name == "embed" else range(0)
        if self.token in rows:
            block = np.array(block, dtype=np.float32)
            block[rows.index(self.token)] = np.nan
        return block


def _drain(engine):
    """The documented loop; returns every output by request id."""
    outs: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def _spy_on_pages(engine):
    """request id -> the (group, page) pairs it held when it was taken out (finished, failed, aborted)."""
    held, remove = {}, engine.scheduler.remove

    def spy(req):
        held[req.request_id] = {(req.group, p) for p in req.pages}
        remove(req)

    engine.scheduler.remove = spy
    return held


def test_nonfinite_request_fails_alone_and_harms_nobody(engine_model, engines, alone, hf_checkpoints):
    clean = engines(engine_model)
    rng = np.random.default_rng(9)
    normal = [(rng.integers(0, 96, int(n)).tolist(), SamplingParams(max_new_tokens=int(m)))
              for n, m in zip(rng.integers(3, 30, 10), rng.integers(4, 12, 10), strict=True)]
    normal.append((rng.integers(0, 96, 12).tolist(), SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)))
    expected = [alone(clean, p, sp) for p, sp in normal]
    unused = set(range(96, VOCAB)) - {t for e in expected for t in e}
    assert unused, "every candidate poison token is made by some clean request"
    poison = min(unused)  # a token no clean request reads or makes
    source = PoisonedSource(HFSource(hf_checkpoints["mixtral"][0]), poison)
    engine = Engine(Model(source.cfg, source, layout=engine_model.layout), base_config(engine_model))
    first, later = normal[:6], normal[6:]

    held = _spy_on_pages(engine)

    # Two poisoned prompts (the NaN in the first prefill chunk; in the second) among six clean ones.
    early = [5, 9, poison, 3, 7, 1, 2]
    late = [int(t) for t in rng.choice(sorted(set(range(VOCAB)) - {poison}), 26)]
    late[20] = poison
    bad = [engine.add_request(early, SamplingParams(max_new_tokens=6)),
           engine.add_request(late, SamplingParams(max_new_tokens=6))]
    ids = [engine.add_request(p, sp) for p, sp in first]
    outs = _drain(engine)
    for rid in bad:
        req, (out,) = engine.requests[rid], outs[rid]
        assert (out.finished, out.finish_reason, out.new_token_ids) == (True, "error", [])
        assert req.finish_reason == "error" and req.output_ids == [] and req.pages == []
        assert "non-finite logits at sequence position" in out.error and out.error == req.error
    assert engine.stats.nonfinite == 2
    poisoned = held[bad[0]] | held[bad[1]]
    assert poisoned  # they wrote NaN KV into these pages, freed now but never zeroed

    # Later requests reuse those pages (the most recently freed go first).
    later_ids = [engine.add_request(p, sp) for p, sp in later]
    _drain(engine)
    assert any(held[i] & poisoned for i in later_ids), "no later request reused a poisoned page"
    got = [engine.requests[i].output_ids for i in ids + later_ids]
    assert [engine.requests[i].finish_reason for i in ids + later_ids] == ["length"] * len(normal)
    assert got == expected, "a clean request's tokens changed next to, or after, a NaN request"
    assert engine.stats.nonfinite == 2
    assert engine.allocator.total_free == NUM_PAGES * engine.groups


@pytest.mark.parametrize("position", [0, 3])
def test_error_row_is_finished_and_freed(engine_model, engines, position, monkeypatch):
    """A row the compiled step marks non-finite (id -1; forced here at one output position) ends its
    request with "error" and no token there, frees its pages, and leaves its neighbour running."""
    if engine_model.layout.data == 1:
        pytest.skip("host-side handling: one layout is enough")
    from moejax.engine.batch import SEED, packed_layout

    engine, real = engines(engine_model), engines(engine_model)._fn
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=6, seed=12345))
    other = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=6, seed=1))
    target, before = engine.requests[rid], engine.stats.nonfinite

    def fn(params, cache, packed, T):
        ids, cache = real(params, cache, packed, T)
        ids = np.asarray(ids).copy()
        _, _, m = packed_layout(T, engine.pages_per_seq)
        if target.num_output == position:
            ids[packed[:, m + SEED] == 12345] = -1
        return ids, cache

    monkeypatch.setattr(engine, "_fn", fn)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    mine = [o for o in outs if o.request_id == rid]
    assert [o.new_token_ids for o in mine[:-1]] == [[t] for t in target.output_ids]
    assert len(target.output_ids) == position and (mine[-1].finish_reason, mine[-1].new_token_ids) == ("error", [])
    assert f"(output position {position})" in mine[-1].error and engine.stats.nonfinite == before + 1
    assert engine.requests[other].finish_reason == "length" and len(engine.requests[other].output_ids) == 6
    assert engine.allocator.total_free == NUM_PAGES * engine.groups
