"""`Model.forward` / `Model.generate` check their input as `Engine.add_request` does (issue 25): one set of
checks (`moejax.engine.sampling`), the same messages, a ValueError before any device work."""

from __future__ import annotations

import numpy as np
import pytest

V = 512  # tiny-moe's vocabulary


@pytest.fixture(scope="module")
def model():
    import moejax

    return moejax.Model.random(moejax.load_model_config("tiny-moe"), layout="DP1")


@pytest.fixture
def no_device_work(model, monkeypatch):
    """Fail the test if a bad call reaches a compiled step."""

    def refuse(*args, **kwargs):
        raise AssertionError("a bad call reached the device")

    monkeypatch.setattr(model.steps, "step", refuse)
    monkeypatch.setattr(model.steps, "forward", refuse)
    return model


BAD_PROMPTS = [
    ([[1.7, 2, 3]], r"must be a 1-D sequence of integer token ids, got shape \(3,\) dtype float64"),
    ([["a", "b"]], r"must be a 1-D sequence of integer token ids, got shape \(2,\) dtype <U1"),
    ([[True, False]], r"integer token ids, got shape \(2,\) dtype bool"),
    ([[]], r"cannot be empty: pass at least one token id"),
    ([[1, 2], [3, [4]]], r"must be a 1-D sequence of integer token ids"),
    ([[1, V]], rf"Token id {V} is out of vocabulary \(vocab_size={V}\)"),
    ([[-1, 2]], rf"Token id -1 is out of vocabulary \(vocab_size={V}\)"),
    ([[[1, 2]]], r"integer token ids, got shape \(1, 2\)"),
]


@pytest.mark.parametrize(("prompts", "message"), BAD_PROMPTS)
def test_generate_refuses_bad_prompts(no_device_work, prompts, message):
    with pytest.raises(ValueError, match=message):
        no_device_work.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize(("prompts", "message"), BAD_PROMPTS)
def test_forward_refuses_bad_rows(no_device_work, prompts, message):
    with pytest.raises(ValueError, match=message):
        no_device_work.forward(prompts)


@pytest.mark.parametrize("prompts", [[], "hello", None, 3])
def test_no_prompts_is_refused(no_device_work, prompts):
    with pytest.raises(ValueError, match=r"non-empty"):
        no_device_work.generate(prompts)
    with pytest.raises(ValueError, match=r"non-empty"):
        no_device_work.forward(prompts)


def test_forward_refuses_ragged_and_too_long_rows(no_device_work):
    with pytest.raises(ValueError, match=r"same length .* got lengths \[2, 3\]"):
        no_device_work.forward([[1, 2], [1, 2, 3]])
    limit = no_device_work.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens, over the context limit"):
        no_device_work.forward([[1] * (limit + 1)])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer, got 2.5"),
    (dict(max_new_tokens=0), r"max_new_tokens must be at least 1, got 0"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer \(booleans are not numbers\)"),
    (dict(stop_token_ids=[V]), rf"stop token id {V} is out of vocabulary"),
    (dict(stop_token_ids=[1.5]), r"stop token id 1.5 in stop_token_ids is not an integer"),
    (dict(stop_token_ids=5), r"stop_token_ids must be a tuple or list"),
    (dict(page_size=0), r"page_size must be at least 1, got 0"),
    (dict(page_size=2.5), r"page_size must be an integer, got 2.5"),
    (dict(max_new_tokens=4096), r"prompt 0 of 3 tokens \+ max_new_tokens 4096 = 4099 exceeds the context limit"),
])
def test_generate_refuses_bad_arguments(no_device_work, kwargs, message):
    with pytest.raises(ValueError, match=message):
        no_device_work.generate([[1, 2, 3]], **kwargs)


def test_messages_are_the_engines(model):
    """The same mistake gets the same message from the engine and from the Model API."""
    import moejax

    engine = moejax.Engine(model, moejax.ServeConfig(max_running=2, page_size=16, num_pages=8, chunk_size=16))
    cases = [([1.7, 2.0], {}), ([1, V], {}), ([1, 2], dict(max_new_tokens=2.5)), ([1, 2], dict(stop_token_ids=[V]))]
    for prompt, kwargs in cases:
        with pytest.raises(ValueError) as by_engine:
            engine.add_request(prompt, moejax.SamplingParams(**kwargs))
        with pytest.raises(ValueError) as by_model:
            model.generate([prompt], **kwargs)
        assert str(by_model.value) == str(by_engine.value).replace("in prompt", "in prompt 0").replace(
            "prompt must", "prompt 0 must")
    assert not engine.has_unfinished()


def test_numpy_prompts_still_run(model):
    """Integer numpy rows are prompts like lists (the checks refuse floats, not numpy)."""
    ids = np.array([[1, 5, 9]], np.int64)
    assert model.generate(ids, max_new_tokens=2) == model.generate([[1, 5, 9]], max_new_tokens=2)
    np.testing.assert_array_equal(model.forward(ids), model.forward([[1, 5, 9]]))


@pytest.mark.parametrize("head_dim", [17, 1])
def test_odd_head_dim_is_refused_by_the_config(head_dim):
    import moejax

    cfg = moejax.load_model_config("tiny-moe")
    with pytest.raises(ValueError, match=rf"ModelConfig.head_dim must be even .*got {head_dim}"):
        cfg.replace(head_dim=head_dim)


def test_an_even_head_dim_the_tiny_config_lacks_runs():
    """Any even width runs (6: not a multiple of the kernels' vector width)."""
    import moejax

    cfg = moejax.load_model_config("tiny-moe").replace(head_dim=6)
    out = moejax.Model.random(cfg, layout="DP1").generate([[1, 2, 3]], max_new_tokens=3)
    assert len(out[0]) == 3
