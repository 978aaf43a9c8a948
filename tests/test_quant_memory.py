"""Weight memory per device of quantized models: the placed arrays against the planner's figure.

The planner (`moejax.planner.memory.weights_per_device`) counts what `moejax.quant` stores: int8 / fp8 values at a
byte, int4 at half a byte (XLA packs them), one bf16 scale per output channel (int4: per block of 128 along the
last contracted dim, where a shard of that dim holds whole blocks), MLA's kv up-projection, the router, the
embedding and the LM head unquantized. What it leaves out on purpose is the norms and DeepSeek's routing bias,
so measured - those == planned, to rounding; and measured within 5% of planned, as `moejax bench quant` shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax.bench.quant import measured_weight_bytes, tiny_config
from moejax.mesh import Layout
from moejax.planner.memory import weights_per_device
from moejax.planner.workload import Workload
from tests.test_quant import CONFIGS

MODELS = {
    "mixtral-48": CONFIGS["mixtral"],  # contracted widths 48 / 32 / 16: int4 falls back to one scale per channel
    "deepseek-48": CONFIGS["deepseek"],  # MLA, a dense first layer, a shared expert
    "deepseek-128": tiny_config("deepseek_v3"),  # int4 blocks of 128: two along the experts' 256 (one per TP2 shard)
}
UNPLANNED = ("norm", "score_bias")  # name endings the planner leaves out (module docstring of moejax.planner.memory)


def _unplanned_bytes(model) -> int:
    """Bytes per device of the arrays the planner does not count (replicated: whole on every device)."""
    total = 0
    for path, array in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        if str(path[-1].key).endswith(UNPLANNED):
            total += array.addressable_shards[0].data.nbytes
    return total


def test_int4_is_counted_at_half_a_byte():
    values = jnp.zeros((4, 1000), jnp.int4)
    assert values.addressable_shards[0].data.nbytes == 4000  # what jax reports: a byte per value
    model = moejax.Model.random(CONFIGS["mixtral"], layout="DP1", dtype="bfloat16", quantization="int4")
    int4 = [a for a in jax.tree.leaves(model.params) if a.dtype == jnp.int4]
    rest = [a for a in jax.tree.leaves(model.params) if a.dtype != jnp.int4]
    assert int4 and measured_weight_bytes(model) == sum(a.size // 2 for a in int4) + sum(a.nbytes for a in rest)


@pytest.mark.parametrize(("name", "layout"), [pytest.param("mixtral-48", "DP1", marks=pytest.mark.slow),
                                            ("mixtral-48", "TP2EP2"),
                                            pytest.param("deepseek-48", "TP2", marks=pytest.mark.slow),
                                            ("deepseek-128", "TP2EP2")])
def test_planner_weights_per_device_equal_the_placed_arrays(name, layout):
    """Every quantization (and bf16) on 2-3 layouts of each tiny model."""
    cfg = MODELS[name]
    for quantization in (None, "int8", "fp8", "int4"):
        model = moejax.Model.random(cfg, layout=layout, dtype="bfloat16", quantization=quantization)
        measured = measured_weight_bytes(model)
        planned = weights_per_device(cfg, Layout.parse(layout), Workload(precision=quantization or "bf16"))
        assert abs(planned / measured - 1) <= 0.05, (quantization, measured, planned)
        np.testing.assert_allclose(planned, measured - _unplanned_bytes(model), rtol=1e-9, err_msg=str(quantization))
