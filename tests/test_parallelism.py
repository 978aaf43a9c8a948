"""`Parallelism`: every parallel choice in one frozen value; its specs, the replication check it enables, and the
expert modes' deprecated names."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import moejax
from moejax import args, sharding
from moejax.bench import results
from moejax.planner.workload import Options
from moejax.sharding import Parallelism

CFG = moejax.ModelConfig(family="qwen3_moe", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2)


def test_specs_follow_the_mode_and_leave_out_axes_of_one_device():
    dp = Parallelism("DP2TP2EP2", "dp_attention")
    rep = Parallelism("DP2TP2EP2", "replicated_attention")
    assert dp.spec(("batch", None)) == P(("data", "expert"), None) and rep.spec(("batch", None)) == P("data", None)
    assert dp.spec(("layers", "experts", "embed", "ffn")) == P(None, "expert", None, "tensor")  # stage is 1
    assert Parallelism("PP2").spec(("layers", "embed")) == P("stage", None)
    assert dp.batch_shards == 4 and rep.batch_shards == 2
    assert dp.tokens_split_over_experts and not rep.tokens_split_over_experts
    assert not Parallelism("DP2", "dp_attention").tokens_split_over_experts  # an expert axis of one device
    with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
        dp.spec(("heads", "vocab"))


def test_parallelism_is_hashable_static_data_and_checks_its_names():
    a, b = Parallelism("EP2", moe_strategy="loop"), Parallelism("EP2", moe_strategy="loop")
    assert a == b and hash(a) == hash(b) and a != a.replace(moe_strategy="gather")
    for bad, match in [({"expert_mode": "data"}, "expert_mode must be one of"),
                       ({"moe_strategy": "dense"}, "unknown MoE dispatch strategy 'dense'"),
                       ({"exchange": "p2p"}, "unknown MoE token exchange 'p2p'")]:
        with pytest.raises(ValueError, match=match):
            Parallelism("EP2", **bad)


def test_a_missing_collective_is_a_trace_time_error(monkeypatch):
    """With the replication check on, the MoE's partial sums left uncombined over the expert group (in the
    replicated_attention mode every device of the group holds the same tokens, so its logits must not differ per
    expert shard) are refused when the step is traced, not returned as wrong logits."""
    ids = np.arange(8).reshape(2, 4) % CFG.vocab_size
    model = moejax.Model.random(CFG, layout="EP2", expert_mode="replicated_attention")
    assert model.steps.check_vma
    model.forward(ids)  # the real model traces and runs
    reduce_axes = Parallelism.reduce_axes.fget  # the MoE block's closing all-reduce, without the expert axis
    monkeypatch.setattr(Parallelism, "reduce_axes", property(lambda self: tuple(a for a in reduce_axes(self)
                                                                                 if a != "expert")))
    broken = moejax.Model.random(CFG, layout="EP2", expert_mode="replicated_attention")
    with pytest.raises(TypeError, match="manual axis types do not match|varying across mesh axes"):
        broken.forward(ids)


def test_deprecated_expert_mode_names_still_work_for_one_release():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = moejax.Model.random(CFG, layout="EP2", ep_attention="replicated")
    said = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("ep_attention is deprecated" in m for m in said), said
    assert any("'replicated' is deprecated: use 'replicated_attention'" in m for m in said), said
    assert model.expert_mode == "replicated_attention" and model.par.expert_mode == "replicated_attention"
    with pytest.warns(DeprecationWarning, match="'data' is deprecated: use 'dp_attention'"):
        assert sharding.expert_mode_of("data") == "dp_attention"
    with pytest.raises(ValueError, match="disagree"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        moejax.Model.random(CFG, layout="EP2", expert_mode="replicated_attention", ep_attention="data")
    with pytest.raises(ValueError, match="expert_mode must be one of"):
        moejax.Model.random(CFG, layout="EP2", expert_mode="tokens")
    with pytest.warns(DeprecationWarning):
        assert Options(expert_mode="replicated").expert_mode == "replicated_attention"
    assert args.expert_modes("data,replicated_attention") == ("dp_attention", "replicated_attention")
    assert args.expert_mode("replicated") == "replicated_attention"
    with pytest.raises(args.UsageError, match=r"--expert-mode: expected comma-separated modes"):
        args.expert_modes("tokens")


def test_sweep_rows_written_under_the_old_names_resume_under_the_new(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"layout": "EP2", "ep_attention": "data", "ep_attention_requested": "default"}\n')
    (row,) = results.read_rows(path)
    assert row == {"layout": "EP2", "expert_mode": "dp_attention", "expert_mode_requested": "default"}


def test_steps_with_another_moe_strategy_share_the_weights():
    model = moejax.Model.random(CFG, layout="EP2", moe_strategy="loop")
    other = model.steps.with_moe(moe_strategy="gather")
    assert other.par.moe_strategy == "gather" and other.par.layout == model.layout
    assert jax.tree.leaves(other.params)[0] is jax.tree.leaves(model.params)[0]  # not copied
    ids = np.arange(12).reshape(2, 6) % CFG.vocab_size
    with jax.set_mesh(model.mesh):
        a = model.steps.forward(model.params, model.steps.put(ids), model.steps.put(np.tile(np.arange(6), (2, 1))))
        b = other.forward(other.params, other.put(ids), other.put(np.tile(np.arange(6), (2, 1))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
