"""HLO collective accounting: loop trip counts, conditionals, group sizes, wire bytes, weight moves."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.bench import comm

# A hand-written module in the shape XLA prints: the entry calls a layer loop (trip count 3) holding an
# all-reduce and a conditional whose heavier branch holds an all-to-all; a loop of unknown trip count holds
# a collective-permute; async all-gather start/done pair; the three replica-group syntaxes.
_LONG = {  # instruction lines longer than the source's 120 columns, in pieces
    "L0": ('  %a2a = f32[4,16]{1,0} all-to-all(%g), channel_id=3, replica_groups=[2,4]<=[8], dimension'
              's={0}, metadata={op_name="jit(fn)/shard_map/moe/dispatch/all_to_all"}'),
    "L1": ('  %ar = f32[4,16]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,'
              '7}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(fn)/jit(_step)/shar'
              'd_map/while/body/closed_call/attn/out/psum"}'),
    "L2": ('  %cp = f32[4,16]{1,0} collective-permute(%x), channel_id=4, source_target_pairs={{0,4},{1'
              ',5},{2,6},{3,7}}, metadata={op_name="jit(fn)/shard_map/ppermute"}'),
    "L3": ('  ROOT %w = (s32[], f32[4,16]{1,0}) while(%t), condition=%cond, body=%body, backend_config'
              '={"known_trip_count":{"n":"3"}}'),
    "L4": ('  %ags = (f32[4,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%x), channel_id=6, replica_grou'
              "ps=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}"),
}
HLO = """HloModule jit_fn, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%light (p: (f32[4,16])) -> (f32[4,16]) {
  ROOT %p = (f32[4,16]{1,0}) parameter(0)
}

%heavy (p: (f32[4,16])) -> (f32[4,16]) {
  %p = (f32[4,16]{1,0}) parameter(0)
  %g = f32[4,16]{1,0} get-tuple-element(%p), index=0
@L0@
  ROOT %t = (f32[4,16]{1,0}) tuple(%a2a)
}

%body (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  %x = f32[4,16]{1,0} get-tuple-element(%p), index=1
@L1@
  %pred = s32[] constant(1)
  %c = (f32[4,16]{1,0}) conditional(%pred, %ar, %ar), branch_computations={%light, %heavy}
  ROOT %r = (s32[], f32[4,16]{1,0}) tuple(%pred, %x)
}

%cond (p: (s32[], f32[4,16])) -> pred[] {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

%body2 (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  %x = f32[4,16]{1,0} get-tuple-element(%p), index=1
@L2@
  ROOT %r = (s32[], f32[4,16]{1,0}) tuple(%p, %cp)
}

%loop_comp (t: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %t = (s32[], f32[4,16]{1,0}) parameter(0)
@L3@
}

ENTRY %main (x: f32[4,16]) -> f32[8,16] {
  %x = f32[4,16]{1,0} parameter(0)
  %t = (s32[], f32[4,16]{1,0}) tuple(%x, %x)
  %call = (s32[], f32[4,16]{1,0}) call(%t), to_apply=%loop_comp
  %w2 = (s32[], f32[4,16]{1,0}) while(%t), condition=%cond, body=%body2
  %rs = f32[1,16]{1,0} reduce-scatter(%x), channel_id=5, replica_groups={}, dimensions={0}, to_apply=%add
@L4@
  ROOT %agd = f32[8,16]{1,0} all-gather-done(%ags)
}
"""
for _name, _line in _LONG.items():
    HLO = HLO.replace(f"@{_name}@", _line)
B = 4 * 16 * 4  # bytes of an f32[4,16]


def test_synthetic_module():
    colls = {c.kind: c for c in comm.collectives(HLO)}
    ar, a2a, cp = colls["all-reduce"], colls["all-to-all"], colls["collective-permute"]
    assert (ar.executions, ar.group, ar.operand_bytes, ar.scope) == (3, 2, B, "attn")
    assert ar.wire_bytes == 2 * (2 - 1) / 2 * B
    assert (a2a.executions, a2a.group, a2a.scope) == (3, 4, "moe")  # the heavier branch, in the 3-trip loop
    assert a2a.wire_bytes == 3 / 4 * B
    assert (cp.executions, cp.trip_known, cp.wire_bytes, cp.scope) == (1, False, B, "ppermute")
    rs, ag = colls["reduce-scatter"], colls["all-gather"]
    assert (rs.group, rs.operand_bytes, rs.wire_bytes) == (8, 8 * 16 * 4, 7 / 8 * 8 * 16 * 4)  # {} = all 8
    assert (ag.group, ag.operand_bytes, ag.wire_bytes) == (2, B, B)  # async form: operand is the first half
    s = comm.summarize(list(colls.values()))
    assert s["by_kind"]["all-reduce"] == {"count": 3, "operand_bytes": 3 * B, "wire_bytes": 3 * B}
    assert s["by_scope"]["attn"] == 3 * B and s["by_scope"]["moe"] == 3 * 0.75 * B
    assert s["unknown_trip_counts"] == 1 and s["weight_moves"] == []
    assert s["wire_bytes"] == pytest.approx(sum(c.wire_bytes * c.executions for c in colls.values()))


def test_bad_text():
    with pytest.raises(ValueError, match="no ENTRY"):
        comm.collectives("HloModule x\n")


def _expert_weight():
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    w = jax.device_put(np.arange(4 * 8 * 16 * 32, dtype=np.float32).reshape(4, 8, 16, 32),
                       NamedSharding(mesh, P(None, "expert")))
    return mesh, w


def test_an_all_gather_of_experts_is_flagged():
    """A real compiled program that gathers an expert-sharded weight (what a bad sharding would make XLA do)."""
    mesh, w = _expert_weight()
    model = SimpleNamespace(params={"layers": {"moe": {"wg": w}}})
    shapes = comm.weight_shapes(model)
    assert ("f32", (4, 1, 16, 32)) in shapes and ("f32", (16, 32)) in shapes and ("f32", (4, 8, 16, 32)) in shapes

    def gather_experts(w):
        return jax.sharding.reshard(w, P()) * 2.0

    with jax.set_mesh(mesh):
        text = jax.jit(gather_experts).lower(w).compile().as_text()
    flagged = [c for c in comm.collectives(text, shapes) if c.weight_move]
    assert flagged and all(c.kind == "all-gather" for c in flagged)
    assert comm.summarize(comm.collectives(text, shapes))["weight_moves"]

    def use_experts_in_place(w, x):  # each device reads only its experts: no collective at all
        return jnp.einsum("led,ledf->lef", x, w, out_sharding=P(None, "expert"))

    x = jax.device_put(np.ones((4, 8, 16), np.float32), NamedSharding(mesh, P(None, "expert")))
    with jax.set_mesh(mesh):
        text = jax.jit(use_experts_in_place).lower(w, x).compile().as_text()
    assert comm.collectives(text, shapes) == []


# The asynchronous forms a GPU program uses (lines as XLA prints them for H100, trimmed): all-to-all,
# reduce-scatter and ragged-all-to-all starts typed ((operands...), result); a synchronous ragged-all-to-all
# typed as its output buffer; each -done is not counted again.
_GPU = {
    "A": ("  %a2as = ((bf16[64,128]{1,0}), bf16[64,128]{1,0}) all-to-all-start(%x), channel_id=1, replica_groups={{0,"
          '1,2,3,4,5,6,7}}, dimensions={0}, metadata={op_name="jit(f)/shard_map/moe/dispatch/all_to_all"}'),
    "R": ("  %rss = ((bf16[64,128]{1,0}), bf16[8,128]{1,0}) reduce-scatter-start(%x), channel_id=2, replica_groups={"
          "{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add"),
    "G": ("  %rgs = ((bf16[64,128]{1,0}, bf16[512,128]{1,0}, s64[8]{0}, s64[8]{0}, s64[8]{0}, /*index=5*/s64[8]{0}), "
          "bf16[512,128]{1,0}) ragged-all-to-all-start(%x, %buf, %o, %s, %o, /*index=5*/%s), channel_id=3, "
          "replica_groups={{0,1,2,3},{4,5,6,7}}"),
    "S": ("  %rg = bf16[32,128]{1,0} ragged-all-to-all(%x, %small, %o, %s, %o, /*index=5*/%s), channel_id=4, "
          'replica_groups=[2,4]<=[8], metadata={op_name="jit(f)/shard_map/moe/combine/ragged_all_to_all"}'),
}
GPU_HLO = """HloModule jit_f, is_scheduled=true, num_partitions=8

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

ENTRY %main (x: bf16[64,128]) -> bf16[512,128] {
  %x = bf16[64,128]{1,0} parameter(0)
  %buf = bf16[512,128]{1,0} parameter(1)
  %small = bf16[32,128]{1,0} parameter(2)
  %o = s64[8]{0} parameter(3)
  %s = s64[8]{0} parameter(4)
@A@
  %a2ad = bf16[64,128]{1,0} all-to-all-done(%a2as)
@R@
  %rsd = bf16[8,128]{1,0} reduce-scatter-done(%rss)
@G@
@S@
  ROOT %rgd = bf16[512,128]{1,0} ragged-all-to-all-done(%rgs)
}
"""
for _name, _line in _GPU.items():
    GPU_HLO = GPU_HLO.replace(f"@{_name}@", _line)


def test_gpu_async_and_ragged_forms():
    colls = comm.collectives(GPU_HLO)
    by = {(c.kind, c.scope): c for c in colls}
    assert sorted(c.kind for c in colls) == ["all-to-all", "ragged-all-to-all", "ragged-all-to-all", "reduce-scatter"]
    a2a = by["all-to-all", "moe"]
    assert (a2a.operand_bytes, a2a.group, a2a.wire_bytes, a2a.bound) == (64 * 128 * 2, 8, 7 / 8 * 64 * 128 * 2, False)
    rs = by["reduce-scatter", "rss"]  # the operand is the inner tuple, not operand + result, nor result x group
    assert (rs.operand_bytes, rs.wire_bytes) == (64 * 128 * 2, 7 / 8 * 64 * 128 * 2)
    rg = by["ragged-all-to-all", "rgs"]  # the input buffer (first operand), not the output or the offsets
    assert (rg.operand_bytes, rg.group, rg.wire_bytes, rg.bound) == (64 * 128 * 2, 4, 3 / 4 * 64 * 128 * 2, True)
    sync = by["ragged-all-to-all", "moe"]  # synchronous: its output buffer
    assert (sync.operand_bytes, sync.group, sync.bound) == (32 * 128 * 2, 4, True)
    s = comm.summarize(colls)
    assert s["by_kind"]["ragged-all-to-all"] == {"count": 2, "operand_bytes": (64 + 32) * 128 * 2,
                                                 "wire_bytes": 3 / 4 * (64 + 32) * 128 * 2}


def test_planner_volume_of_a_split_layout_by_hand():
    """tiny-moe (D 128, top-2 of 8 experts, 4 layers) on TP4MTP1EP8, 8 float32 tokens per attention group: two
    all-reduces over attention TP4 per layer; the all-to-all over the 8 expert ranks of each device's quarter of the
    group's tokens (the `tensor_expert` slice). Expected: the remote share of the top-2 fanout; capacity: 2 rows to
    each of the 7 peers each way, with the 2 local ids and gates per row, and the int32 max that picks it."""
    from moejax.config import load_model_config
    from moejax.planner.cost import expert_fanout
    from moejax.planner.hardware import load_hardware

    cfg, hw, msg = load_model_config("tiny-moe"), load_hardware("cpu-host"), 8 * 128 * 4
    expected, capacity = (comm.planner_volume(cfg, "TP4MTP1EP8", "dp_attention", 8, 4, hw, exchange=mode)
                          for mode in comm.EXCHANGE_FIGURES)
    all_reduce = 4 * 2 * 2 * 3 / 4 * msg
    assert expected["by_kind"]["all-reduce"] == pytest.approx(all_reduce) == expected["tensor"]
    assert expected["by_kind"]["all-to-all"] == pytest.approx(4 * 2 * msg / 4 * expert_fanout(8, 2, 8) * 7 / 8)
    assert capacity["by_kind"]["all-reduce"] == pytest.approx(all_reduce + 4 * 2 * 7 / 8 * 4)
    assert capacity["by_kind"]["all-to-all"] == pytest.approx(4 * 7 * 2 * (128 * 4 + 2 * (4 + 4) + 128 * 4))
    for volume in (expected, capacity):
        assert volume["total"] == pytest.approx(sum(volume["by_kind"].values()))
        assert volume["by_kind"]["all-gather"] == volume["by_kind"]["reduce-scatter"] == volume["send"] == 0
    # TP2MTP4EP2: the tokens gathered over data_tensor (2) and scattered back, the routing gathered with them
    gathered = comm.planner_volume(cfg, "TP2MTP4EP2", "dp_attention", 8, 4, hw, exchange="capacity")["by_kind"]
    assert gathered["reduce-scatter"] == pytest.approx(4 * msg)
    assert gathered["all-gather"] == pytest.approx(4 * (msg + 8 * 2 * (4 + 4)))
    with pytest.raises(ValueError, match="exchange must be one of"):
        comm.planner_volume(cfg, "TP2EP2", "dp_attention", 8, 4, hw, exchange="mean")
