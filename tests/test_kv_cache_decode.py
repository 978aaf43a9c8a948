"""Cache invariants: prefill + decode steps == one full forward; chunked prefill == one-shot prefill."""

import numpy as np
import pytest

from moejax import steps as steps_lib

PAGE = 4


def _run_chunks(model, ids, chunks, page_size=PAGE):
    """Feed `ids` [B, T] through the paged step in the given chunk sizes; logits at every position."""
    B, T = ids.shape
    pages = -(-T // page_size)
    cache = model.steps.new_cache(B * pages, page_size)
    table = np.arange(B * pages, dtype=np.int32).reshape(B, pages) % (B * pages // model.batch_shards)
    out, start = [], 0
    for size in chunks:
        tokens = ids[:, start: start + size].astype(np.int32)
        pos = np.broadcast_to(np.arange(start, start + size, dtype=np.int32), tokens.shape)
        # The step returns logits at one index per row; re-running a chunk for each index rewrites the
        # same KV values, so it reads the logits at every position without changing the cache.
        for j in range(size):
            index = np.full(B, j, np.int32)
            logits, _, cache = model.steps.step(model.params, cache, model.steps.put(tokens), model.steps.put(pos),
                                                model.steps.put(table), model.steps.put(index, steps_lib.TOKENS))
            out.append(np.asarray(logits))
        start += size
    assert start == T
    return np.stack(out, axis=1)


@pytest.mark.parametrize("layout", ["DP1", "DP2TP2EP2", "TP2EP2PP2"])
def test_prefill_then_decode_equals_full_forward(layout, hf_checkpoints):
    import moejax

    path, _ = hf_checkpoints["qwen3_moe"]
    model = moejax.load(path, layout=layout)
    ids = np.random.default_rng(11).integers(0, 128, (4, 14))  # a row per data group (4 in DP2TP2EP2)
    full = model.forward(ids)
    stepped = _run_chunks(model, ids, [6] + [1] * 8)  # prefill 6 tokens, then 8 decode steps
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_shot(hf_checkpoints, models_1dev):
    """Chunks of 3 and 5 with page size 4: boundaries fall inside pages."""
    model = models_1dev["mixtral"]
    ids = np.random.default_rng(12).integers(0, 128, (2, 16))
    one_shot = _run_chunks(model, ids, [16])
    chunked = _run_chunks(model, ids, [3, 5, 3, 5])
    np.testing.assert_allclose(chunked, one_shot, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one_shot, model.forward(ids), atol=1e-5, rtol=0)
