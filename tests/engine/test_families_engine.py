"""Serving-engine invariants for DeepSeek-V3, GLM-4.5, OLMoE, gpt-oss and Qwen2-MoE on multi-device layouts, float32.

A request's greedy tokens are the same served alone (and equal to Hugging Face's `generate`) as among others, with a
small prefill chunk, and with a KV pool small enough that requests are preempted and recomputed. The layouts:
DeepSeek-V3 DP2EP2 dp_attention (the MLA latent pool's pages split over data x expert), GLM-4.5 TP2EP2
replicated_attention, OLMoE DP2TP2EP2 dp_attention (q/k norms over heads split by tensor), gpt-oss TP2PP2
(pipelined microbatches; attention sinks and sliding windows on the paged path); and two split layouts, DeepSeek-V3
TP2MTP1EP4 and Qwen2-MoE TP2MTP4EP2 (attention TP x DP, the MoE TP x EP over the same devices).

Engines have 32 pages of 4 tokens per data group (tests/engine/conftest.py); the preemption test's have 16 (a request
needs up to 15), so two running requests of a group can collide.
"""

from __future__ import annotations

import numpy as np
import pytest

from moejax import Engine, SamplingParams
from tests import hf_models
from tests.engine.conftest import base_config
from tests.engine.test_engine import VOCAB, check_busy_matches_alone, check_preempted_requests_match_alone

CASES = [("deepseek_v3", "DP2EP2", "dp_attention"), ("glm4_moe", "TP2EP2", "replicated_attention"),
         ("olmoe", "DP2TP2EP2", "dp_attention"), ("gpt_oss", "TP2PP2", "dp_attention"),
         # split layouts (tests/test_split_layouts.py): the MLA latent pool over attention's 2 data groups, the
         # exchange over 4 expert ranks in token slices; Qwen2-MoE's gated shared expert, tokens all-gathered over
         # the MoE's wider tensor split
         ("deepseek_v3", "TP2MTP1EP4", "dp_attention"), ("qwen2_moe", "TP2MTP4EP2", "dp_attention")]
SMALL_POOL = 16  # pages per data group
# The chunk and preemption tests of GLM-4.5 TP2EP2, OLMoE DP2TP2EP2 and the two split layouts run in CI's slow step:
# their paged path is the tiny Mixtral's (tests/engine/test_engine.py, tests/engine/test_split_engine.py); the
# busy-engine test (against HF's tokens too) runs every case.
SLOW_CHUNKS_AND_PREEMPTION = {("glm4_moe", "TP2EP2"), ("olmoe", "DP2TP2EP2"), ("deepseek_v3", "TP2MTP1EP4"),
                              ("qwen2_moe", "TP2MTP4EP2")}  # the split layouts' busy test runs by default


def _cases(slow=frozenset()):
    """CASES as `family_model`'s parameters, those (family, layout) in `slow` marked slow."""
    return pytest.mark.parametrize("family_model", [
        pytest.param(case, id=f"{case[0]}-{case[1]}", marks=pytest.mark.slow if case[:2] in slow else ())
        for case in CASES], indirect=True)


@pytest.fixture(scope="module")
def family_model(request, hf_checkpoints):
    import moejax

    family, layout, mode = request.param
    path, torch_model = hf_checkpoints[family]
    model = moejax.load(path, layout=layout, expert_mode=mode)
    model.torch_reference = torch_model
    return model


@pytest.fixture(scope="module")
def engine_of():
    """(model, **config overrides) -> a warm Engine, reused across tests (they leave it idle)."""
    cache = {}

    def get(model, **overrides):
        key = (id(model), tuple(sorted(overrides.items())))
        if key not in cache:
            engine = Engine(model, base_config(model, **overrides))
            engine.warmup()
            cache[key] = (model, engine)  # the model kept alive with its key
        engine = cache[key][1]
        assert not engine.has_unfinished()
        return engine

    yield get
    cache.clear()


@_cases()
def test_request_joining_busy_engine_matches_alone(family_model, engine_of, alone):
    prompt, tokens = check_busy_matches_alone(engine_of(family_model), alone, np.random.default_rng(31), 12, 10, (3, 7))
    assert tokens == hf_models.hf_greedy(family_model.torch_reference, prompt, 12)


@_cases(SLOW_CHUNKS_AND_PREEMPTION)
def test_small_prefill_chunks_give_identical_tokens(family_model, engine_of, alone):
    # Chunks of 7 with pages of 4: chunk boundaries (7, 14, 21, 28) fall inside pages (and, for gpt-oss, inside
    # its window of 8); the reference runs chunks of 16.
    rng = np.random.default_rng(32)
    prompts = [rng.integers(0, VOCAB, 30).tolist(), rng.integers(0, VOCAB, 13).tolist()]
    params = SamplingParams(max_new_tokens=10)
    reference = [alone(engine_of(family_model), p, params) for p in prompts]
    assert engine_of(family_model, chunk_size=7).generate(prompts, params) == reference


@_cases(SLOW_CHUNKS_AND_PREEMPTION)
def test_preempted_requests_give_identical_tokens(family_model, engine_of, alone):
    check_preempted_requests_match_alone(engine_of(family_model, num_pages=SMALL_POOL), alone,
                                         np.random.default_rng(33), 6, (14, 20), 0.25, 2)
