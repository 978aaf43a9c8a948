"""The expert axis's two modes, "dp_attention" (attention data-parallel over the expert group, tokens exchanged
all-to-all) and "replicated_attention" (tokens replicated, one all-reduce): both exact, and each moves what it says.
"""

import re

import jax
import numpy as np
import pytest

import moejax
from moejax import steps as steps_lib

LAYOUTS = ["EP8", "DP2EP4", "TP2EP4", "EP4PP2", "DP2TP2EP2"]
MODES = ["dp_attention", "replicated_attention"]
# The default suite keeps both modes on DP2TP2EP2 (EP alone in "dp_attention", the default mode, is
# tests/test_sharded_equivalence.py's qwen2_moe EP8); the other layouts run in CI's slow step.
DEFAULT = {("DP2TP2EP2", "dp_attention"), ("DP2TP2EP2", "replicated_attention")}
CASES = [pytest.param(layout, mode, marks=() if (layout, mode) in DEFAULT else pytest.mark.slow)
         for layout in LAYOUTS for mode in MODES]


@pytest.mark.parametrize(("layout", "mode"), CASES)
def test_modes_match_one_device(hf_checkpoints, models_1dev, layout, mode):
    family = "qwen2_moe"  # a shared expert: split over tensor x expert (replicated_attention) or tensor (dp_attention)
    path, _ = hf_checkpoints[family]
    model = moejax.load(path, layout=layout, expert_mode=mode)
    base = models_1dev[family]
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 128, (8, 13))  # 8 rows: every batch shard holds rows in "dp_attention" mode
    np.testing.assert_allclose(model.forward(ids), base.forward(ids), atol=1e-5, rtol=0)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 9, 17)]
    assert model.generate(prompts, max_new_tokens=32) == base.generate(prompts, max_new_tokens=32)


def _decode_hlo(model, rows):
    steps = model.steps
    cache = steps.new_cache(4 * model.batch_shards, 4)
    args = [steps.put(np.zeros((rows, 1), np.int32)), steps.put(np.zeros((rows, 1), np.int32)),
            steps.put(np.zeros((rows, 2), np.int32)), steps.put(np.zeros((rows,), np.int32), steps_lib.TOKENS)]
    with jax.set_mesh(model.mesh):
        return steps.step.lower(model.params, cache, *args).compile().as_text(), cache


def _collectives(text):
    """{(kind, operand type)} of the program's collectives, e.g. ("all-to-all", "f32[8,2,48]")."""
    kinds = "all-to-all|all-reduce|all-gather|reduce-scatter|collective-permute"
    return set(re.findall(rf"= (\([^)]*\)|\S+) ({kinds})(?:-start)?\(", text))  # XLA:CPU: tuple-typed all-to-all


def test_data_mode_exchanges_tokens_and_splits_attention(hf_checkpoints):
    path, _ = hf_checkpoints["mixtral"]
    data = moejax.load(path, layout="EP8", expert_mode="dp_attention")
    replicated = moejax.load(path, layout="EP8", expert_mode="replicated_attention")
    assert (data.batch_shards, replicated.batch_shards) == (8, 1)
    text_d, _ = _decode_hlo(data, 16)
    text_r, _ = _decode_hlo(replicated, 16)
    # "dp_attention": tokens go to the experts and back (all-to-all); the only all-reduce is the scalar max that
    # sizes the exchange — no all-reduce or all-gather of weights or activations. "replicated_attention": the
    # experts' outputs are all-reduced, and nothing is exchanged.
    kinds_d = {kind for _, kind in _collectives(text_d)}
    assert kinds_d <= {"all-to-all", "all-reduce"} and "all-to-all" in kinds_d
    assert {t for t, kind in _collectives(text_d) if kind == "all-reduce"} <= {"s32[]"}
    assert {kind for _, kind in _collectives(text_r)} == {"all-reduce"}
    assert any(t.startswith("f32[") for t, _ in _collectives(text_r))
    # Each device attends over its own rows only, with 1/EP of the KV pool of the same total pages.
    rows_d = {s.data.shape[0] for s in data.steps.put(np.zeros((16, 1), np.int32)).addressable_shards}
    assert rows_d == {2}
    total_pages = 4 * 8
    pool_d = data.steps.new_cache(total_pages, 4)[0]
    pool_r = replicated.steps.new_cache(total_pages, 4)[0]
    assert pool_d.addressable_shards[0].data.nbytes * 8 == pool_r.addressable_shards[0].data.nbytes


def test_ragged_exchange_is_refused_on_cpu_before_any_device_work(hf_checkpoints):
    path, _ = hf_checkpoints["mixtral"]
    with pytest.raises(ValueError, match="XLA:CPU has none: use exchange 'all_to_all'"):
        moejax.load(path, layout="EP8", exchange="ragged_all_to_all")
    with pytest.raises(ValueError, match="expert_mode must be one of"):
        moejax.load(path, layout="EP8", expert_mode="tokens")


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="XLA:CPU has no ragged-all-to-all")
def test_ragged_exchange_equals_fixed_capacity(hf_checkpoints):  # pragma: no cover - accelerator only
    path, _ = hf_checkpoints["mixtral"]
    n = min(8, jax.device_count())
    ids = np.random.default_rng(12).integers(0, 128, (n, 9))
    fixed = moejax.load(path, layout=f"EP{n}", exchange="all_to_all").forward(ids)
    np.testing.assert_allclose(moejax.load(path, layout=f"EP{n}", exchange="ragged_all_to_all").forward(ids), fixed,
                               atol=1e-5, rtol=0)
