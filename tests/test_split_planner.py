"""Split layouts (`TP{t}MTP{m}EP{e}`): the planner against the placed model and the compiled decode step.

Memory: the weights one device holds (random models placed on 8 simulated devices) and the KV pools the engine
allocates per device equal the planner's figures. Collectives: the compiled decode step's (read from its HLO,
`moejax.bench.comm`) equal, kind by kind, the planner's capacity figure (`planner_volume(exchange="capacity")`:
the runtime's fixed-capacity all-to-all as the compiled program bounds it); the planner's prediction
(`exchange="expected"`, the expected routing fanout) is the same but for the all-to-all, which the capacity bounds
from above, and the routing ids and gates that ride along.
"""

import jax
import pytest

import moejax
from moejax.bench import comm
from moejax.bench.quant import measured_weight_bytes
from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner.layout import PlanLayout
from moejax.planner.memory import stage_kv_bytes, stages, weights_per_device
from moejax.planner.workload import Options, Workload
from tests.test_quant import CONFIGS

TINY = load_model_config("tiny-moe")  # Mixtral-shaped: 8 experts, 8 heads / 2 kv heads, 4 layers
MODELS = {"tiny-moe": TINY, "deepseek": CONFIGS["deepseek"]}  # the second: MLA, a dense layer, a shared expert
# (tensor, tensor_expert, data_tensor, expert) mesh axes in the comments: each split axis, stages, data parallelism
LAYOUTS = ["TP4MTP1EP4",  # 1, 4, 1, 1: attention TP4, the MoE EP4
           "TP2MTP4EP2",  # 2, 1, 2, 2: tokens gathered over data_tensor, exchanged over expert
           "TP4MTP2EP2",  # 2, 2, 1, 1
           "DP2TP2MTP1EP2",  # 1, 2, 1, 1, twice
           "TP2MTP1EP2PP2"]  # 1, 2, 1, 1, two stages
UNPLANNED = ("norm", "score_bias")  # arrays the planner leaves out (moejax.planner.memory's module docstring)


def _unplanned_bytes(model) -> int:
    return sum(a.addressable_shards[0].data.nbytes for path, a in jax.tree_util.tree_flatten_with_path(model.params)[0]
               if str(path[-1].key).endswith(UNPLANNED))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_per_device_equal_the_placed_arrays(name, layout):
    cfg = MODELS[name]
    model = moejax.Model.random(cfg, layout=layout, dtype="bfloat16")
    planned = weights_per_device(cfg, Layout.parse(layout), Workload(precision="bf16"))
    assert planned == measured_weight_bytes(model) - _unplanned_bytes(model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_pools_per_device_equal_the_planner(layout):
    """The engine's pools: `num_pages` pages of `page_size` slots per attention data group, split over the group's
    data axes, its kv heads over attention TP. The planner: one request per attention group at a context of those
    slots, on every stage."""
    pages, page_size = 12, 4
    model = moejax.Model.random(TINY, layout=layout, dtype="bfloat16")
    lay = PlanLayout.of(layout)
    engine = moejax.Engine(model, moejax.ServeConfig(max_running=lay.data * lay.attention_data * lay.stage,
                                                     num_pages=pages, page_size=page_size, max_model_len=16))
    assert engine.groups == lay.data * lay.attention_data
    device = model.mesh.devices.flat[0]
    runtime = sum(s.data.nbytes for pool in jax.tree.leaves(engine.cache) for s in pool.addressable_shards
                  if s.device == device)
    workload = Workload(isl=pages * page_size - 1, osl=1, kv_precision="bf16")
    planned = [stage_kv_bytes(TINY, lay.layout, workload, Options(), lay.attention_data, stage)
               for stage in stages(TINY, lay)]
    assert runtime == max(planned) == pages * page_size * TINY.num_layers // lay.stage * 2 * max(
        2, lay.tensor) // lay.tensor * 16 * 2  # slots x layers x (k, v) x kv heads per device x H x bf16


@pytest.fixture(scope="module")
def decode_steps():
    """layout -> `comm.decode_comparison` of tiny-moe's compiled decode step (8 tokens per batch shard, float32)."""
    cache = {}

    def get(layout):
        if layout not in cache:
            cache[layout] = comm.decode_comparison(moejax.Model.random(TINY, layout=layout, dtype="float32"))
        return cache[layout]

    return get


# Every MoE collective the runtime chooses (`moejax.sharding.Parallelism`): the exchange with tensor_expert slices
# (TP4MTP1EP8), the gather / scatter with the exchange (TP2MTP4EP2, TP1MTP2EP4) and without it (TP2MTP4EP1), the
# closing all-reduce alone (TP4MTP2EP2, DP2TP2MTP1EP2), pipeline sends (TP2MTP1EP2PP2); and a runtime layout.
HLO_LAYOUTS = ["TP4MTP1EP8", "TP2MTP4EP2", "TP2EP4",
               *(pytest.param(lay, marks=pytest.mark.slow) for lay in ("TP4MTP2EP2", "TP1MTP2EP4", "TP2MTP4EP1",
                                                                        "TP2MTP1EP2PP2", "DP2TP2MTP1EP2"))]


@pytest.mark.parametrize("layout", HLO_LAYOUTS)
def test_compiled_decode_collectives_are_the_planner_s(decode_steps, layout):
    row = decode_steps(layout)
    hlo = {k: v["wire_bytes"] for k, v in row["hlo"]["by_kind"].items()}
    capacity, expected = row["capacity"]["by_kind"], row["expected"]["by_kind"]
    _, y, z, w = Layout.parse(layout).split_factors
    assert row["hlo"]["weight_moves"] == [] and row["hlo"]["unknown_trip_counts"] == 0
    for kind in comm.KINDS:  # the capacity figure counts what the compiled step sends, collective for collective
        assert hlo[kind] == pytest.approx(capacity[kind], rel=1e-9, abs=1e-9), kind
    total = row["hlo"]["wire_bytes"]
    assert total == pytest.approx(row["capacity"]["total"], rel=0.10)
    assert (hlo["all-gather"] > 0) == (hlo["reduce-scatter"] > 0) == (z > 1)
    assert (hlo["all-to-all"] > 0) == (w > 1)
    # The prediction: the same all-reduces and sends, the gather's and scatter's tokens (routing ids and gates
    # aside, X of each per token against D = 128 values), and at most the all-to-all's capacity.
    for kind in ("all-reduce", "collective-permute", "reduce-scatter"):
        assert expected[kind] == pytest.approx(hlo[kind], rel=1e-3, abs=8 * 4), kind
    assert expected["all-gather"] == pytest.approx(hlo["all-gather"], rel=0.05)
    assert expected["all-to-all"] <= hlo["all-to-all"]
    if w == 1:
        assert row["expected"]["total"] == pytest.approx(total, rel=0.10)


def test_split_table_has_a_row_per_layout(decode_steps):
    text = comm.format_split_table([decode_steps("TP4MTP1EP8"), decode_steps("DP2TP2MTP1EP2")])
    rows = text.splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| TP4MTP1EP8", "| DP2TP2MTP1EP2"]
    assert "A2A 16: " in rows[0] and rows[0].endswith("(1.00) |") and "A2A" not in rows[1]
