"""The serving engine on split layouts (attention TP x DP, the MoE TP x EP over the same devices): the tiny Mixtral
on TP2MTP1EP4 (attention DP 2, the exchange over 4 expert ranks with token slices) and TP2MTP4EP2 (attention DP 4,
tokens all-gathered over the MoE's wider tensor split). KV pages and request rows are split over attention's data
groups (`Engine.groups` = 2 and 4). Each engine invariant of the runtime layouts holds: a request's tokens are the
same alone and among others (and Hugging Face's), with small prefill chunks, under preemption, and beside a request
whose activations turn NaN."""

from __future__ import annotations

import numpy as np
import pytest

from tests import hf_models
from tests.engine import test_isolation
from tests.engine.test_engine import VOCAB, check_busy_matches_alone, check_preempted_requests_match_alone

SPLIT = ["TP2MTP1EP4", "TP2MTP4EP2"]


@pytest.fixture(scope="module", params=SPLIT)
def split_model(request, hf_checkpoints):
    import moejax

    path, torch_model = hf_checkpoints["mixtral"]
    model = moejax.load(path, layout=request.param)
    model.torch_reference = torch_model
    return model


def test_attention_data_groups_hold_the_requests(split_model, engines):
    engine = engines(split_model)
    assert engine.groups == split_model.layout.attention_data == split_model.batch_shards


def test_request_joining_busy_engine_matches_alone(split_model, engines, alone):
    prompt, tokens = check_busy_matches_alone(engines(split_model), alone, np.random.default_rng(51), 12, 10, (3, 7))
    assert tokens == hf_models.hf_greedy(split_model.torch_reference, prompt, 12)


def test_small_prefill_chunks_give_identical_tokens(split_model, engines, alone):
    rng = np.random.default_rng(52)
    prompts = [rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, 13).tolist()]
    from moejax import SamplingParams

    params = SamplingParams(max_new_tokens=10)
    reference = [alone(engines(split_model), p, params) for p in prompts]
    assert engines(split_model, chunk_size=7).generate(prompts, params) == reference


def test_preempted_requests_give_identical_tokens(split_model, engines, alone):
    check_preempted_requests_match_alone(engines(split_model, num_pages=16), alone, np.random.default_rng(53), 6,
                                         (14, 20), 0.25, 2)


def test_nonfinite_request_fails_alone_and_harms_nobody(split_model, engines, alone, hf_checkpoints):
    test_isolation.test_nonfinite_request_fails_alone_and_harms_nobody(split_model, engines, alone, hf_checkpoints)
