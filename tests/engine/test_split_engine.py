"""The serving engine's request groups and numerical isolation on split layouts (attention TP x DP, the MoE TP x EP
over the same devices): the tiny Mixtral on TP2MTP1EP4 (attention DP 2, the exchange over 4 expert ranks in token
slices) and TP2MTP4EP2 (attention DP 4, tokens all-gathered over the MoE's wider tensor split). KV pages and
request rows are split over attention's data groups. Busy == alone, small chunks and preemption on split layouts:
tests/engine/test_families_engine.py."""

from __future__ import annotations

import pytest

from tests.engine import test_isolation

SPLIT = ["TP2MTP1EP4", "TP2MTP4EP2"]


@pytest.fixture(scope="module", params=SPLIT)
def split_model(request, hf_checkpoints):
    import moejax

    return moejax.load(hf_checkpoints["mixtral"][0], layout=request.param)


def test_attention_data_groups_hold_the_requests_and_pages(split_model, engines):
    engine = engines(split_model)
    assert engine.groups == split_model.layout.attention_data == split_model.batch_shards
    assert engine.allocator.total_free == engine.config.num_pages * engine.groups


def test_nonfinite_request_fails_alone_and_harms_nobody(split_model, engines, alone, hf_checkpoints):
    test_isolation.test_nonfinite_request_fails_alone_and_harms_nobody(split_model, engines, alone, hf_checkpoints)
