"""Vocabulary and FFN widths that the tensor (x expert) size does not divide: padded per shard, exact.

Tiny random HF checkpoints with vocab 97 / 131 and FFN widths not divisible by 4, served on TP2 and
TP4 layouts: logits equal HF's (padded columns never returned) and greedy tokens equal HF generate.
"""

import numpy as np
import pytest

import moejax
from tests import hf_models

CASES = {  # family -> config overrides: odd vocabulary, FFN widths not divisible by 4 (or by TP x EP)
    "mixtral": dict(vocab_size=97, intermediate_size=30),
    "qwen2_moe": dict(vocab_size=131, moe_intermediate_size=30, shared_expert_intermediate_size=36),
}


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return {f: (root / f, hf_models.build(f, root / f, seed=3, **kw)) for f, kw in CASES.items()}


# The default suite runs each family and each layout once; the other three cases in CI's slow step.
DEFAULT = {("mixtral", "TP2"), ("mixtral", "TP2EP2PP2"), ("qwen2_moe", "TP4EP2")}


@pytest.mark.parametrize(("family", "layout"), [
    pytest.param(f, lay, marks=() if (f, lay) in DEFAULT else pytest.mark.slow)
    for f in sorted(CASES) for lay in ("TP2", "TP4EP2", "TP2EP2PP2")])
def test_odd_vocab_and_ffn_match_hf(odd_checkpoints, family, layout):
    path, ref = odd_checkpoints[family]
    vocab = CASES[family]["vocab_size"]
    model = moejax.load(path, layout=layout)
    assert model.geometry.vocab % model.layout.tensor == 0 and model.geometry.vocab > vocab
    ids = np.random.default_rng(0).integers(0, vocab, (2, 11))
    logits = model.forward(ids)
    assert logits.shape == (2, 11, vocab)  # exactly vocab_size columns
    np.testing.assert_allclose(logits, hf_models.hf_logits(ref, ids), atol=1e-4, rtol=0)
    prompt = ids[0, :7].tolist()
    assert model.generate([prompt], max_new_tokens=8)[0] == hf_models.hf_greedy(ref, prompt, 8)


def test_engine_never_samples_a_padded_column(odd_checkpoints):
    """Sampling at a high temperature over many draws: every token id is < vocab_size."""
    path, _ = odd_checkpoints["mixtral"]
    model = moejax.load(path, layout="TP4")
    engine = moejax.Engine(model, moejax.ServeConfig(max_running=4, page_size=4, num_pages=64, chunk_size=8,
                                                     max_model_len=64))
    params = [moejax.SamplingParams(max_new_tokens=40, temperature=50.0, seed=s) for s in range(4)]
    outs = engine.generate([[1, 2, 3]] * 4, params)
    tokens = np.array(outs)
    assert tokens.max() < 97 and len(set(tokens.ravel().tolist())) > 40  # near-uniform draws, none padded
