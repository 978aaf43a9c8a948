"""The cost model in jax.numpy: vmapped over a whole sweep it equals the NumPy path, and it is differentiable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import load_model_config
from moejax.planner.calibrate import log_loss, predict_batch
from moejax.planner.hardware import load_hardware
from moejax.planner.rules import Rules, enumerate_layouts
from moejax.planner.serving import evaluate, features, predict, stack
from moejax.planner.workload import Options, Workload

METRICS = ("ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user", "t_compute_s", "t_memory_s",
           "t_comm_s")


def _sweep():
    cfg, hw, w = load_model_config("qwen3-235b-a22b"), load_hardware("h200"), Workload(precision="fp8")
    layouts, _ = enumerate_layouts(16, cfg, Rules(split_moe=True))
    configs = [(lay, b, c) for lay in layouts for b in (1, 16, 128) for c in (512, 4096)]
    return cfg, hw, w, configs, stack([features(cfg, lay, hw, w, Options(), b, c) for lay, b, c in configs])


def test_vmapped_jax_equals_numpy_and_scalar_paths():
    cfg, hw, w, configs, feats = _sweep()
    assert len(configs) > 500
    eff = hw.efficiency.as_dict()
    numpy_out = evaluate(feats, eff)  # one vectorised NumPy call
    jax_out = predict_batch(feats, eff)  # jax.vmap of the same function in jax.numpy (float32)
    for m in METRICS:
        np.testing.assert_allclose(np.asarray(jax_out[m]), numpy_out[m], rtol=2e-4, atol=1e-9)
    for i in range(0, len(configs), 97):  # the scalar path (predict) is the same numbers
        lay, b, c = configs[i]
        p = predict(cfg, lay, hw, w, batch=b, chunk=c)
        assert (p.ttft_s, p.tpot_s) == pytest.approx((numpy_out["ttft_s"][i], numpy_out["tpot_s"][i]))


def test_gradient_with_respect_to_every_parameter_is_finite():
    _, hw, _, _, feats = _sweep()
    eff = {k: jnp.float32(v) for k, v in hw.efficiency.as_dict().items()}
    targets = {m: jnp.asarray(evaluate(feats, hw.efficiency.as_dict())[m] * 1.1, dtype=jnp.float32)
               for m in ("ttft_s", "tpot_s", "tokens_per_s_per_device")}
    grad = jax.grad(lambda e: log_loss(feats, targets, e))(eff)
    assert all(bool(jnp.isfinite(g)) for g in grad.values())
    assert grad["compute"] != 0 and grad["memory"] != 0 and grad["network"] != 0 and grad["kernel_s"] != 0
