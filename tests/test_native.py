"""The native few-row expert kernel (moejax.native) against the XLA path it replaces.

Skipped where the library was not built or does not load (the XLA path is then the only one, and the
rest of the suite covers it). The kernel is opt-in: CI runs this file again with MOEJAX_NATIVE=1, where
the tests that need the kernel run; the engine comparisons set the switch in their own subprocesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import native
from moejax.model import moe

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel off or unavailable: MOEJAX_NATIVE="
                                         f"{os.environ.get(native.ENV, '')!r}, {native.unavailable_reason()}")


def _reference(x, wg, wu, wd, layer, expert, count):
    out = (jax.nn.silu(x @ wg[layer, expert]) * (x @ wu[layer, expert])) @ wd[layer, expert]
    return jnp.where(jnp.arange(x.shape[0])[:, None] < count, out, 0)


@needs_kernel
@pytest.mark.parametrize("L, E, D, F", [(1, 1, 8, 8), (3, 4, 64, 96), (2, 8, 40, 200), (2, 3, 128, 1000)])
def test_kernel_equals_xla(L, E, D, F):
    rng = np.random.default_rng(L * 1000 + F)
    wg, wu = (jnp.asarray(rng.standard_normal((L, E, D, F), np.float32) * 0.2) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((L, E, F, D), np.float32) * 0.2)
    call = jax.jit(native.expert_swiglu, static_argnames="max_threads")
    for C in (1, 2, 5, 8, 17):
        x = jnp.asarray(rng.standard_normal((C, D), np.float32))
        for count in sorted({0, 1, C // 2, C}):
            for layer, expert in ((0, 0), (L - 1, E - 1), (L // 2, E // 2)):
                want = _reference(x, wg, wu, wd, layer, expert, count)
                for threads in (1, 2):
                    got = call(x, wg, wu, wd, layer, expert, count, max_threads=threads)
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want)) + 1))


@needs_kernel
def test_kernel_inside_a_loop_with_traced_indices():
    rng = np.random.default_rng(0)
    L, E, D, F, C = 3, 4, 32, 48, 4
    wg, wu = (jnp.asarray(rng.standard_normal((L, E, D, F), np.float32) * 0.2) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((L, E, F, D), np.float32) * 0.2)
    x = jnp.asarray(rng.standard_normal((C, D), np.float32))

    def chain(fn):
        def body(i, x):
            return x + 0.1 * fn(x, wg, wu, wd, i // E, i % E, (i % C) + 1)
        return jax.jit(lambda x: jax.lax.fori_loop(0, L * E, body, x))(x)

    np.testing.assert_allclose(chain(native.expert_swiglu), chain(_reference), rtol=1e-5, atol=1e-5)


def _compiled_dispatch_text():
    rng = np.random.default_rng(0)
    E, D, F, M = 4, 16, 24, 3
    x = rng.standard_normal((M, D)).astype(np.float32)
    w = tuple(rng.standard_normal(s).astype(np.float32) for s in ((2, E, D, F), (2, E, D, F), (2, E, F, D)))
    weights, experts = rng.random((M, 2)).astype(np.float32), np.array([[0, 1], [1, 2], [0, 3]], np.int32)
    fn = jax.jit(lambda x, we, ex, w: moe._dispatch_loop(x, we, ex, w, 1))  # a fresh trace per call
    return fn.lower(x, weights, experts, w).as_text()


def test_xla_path_when_switched_off(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available() and not native.enabled()
    assert "moejax_expert_swiglu" not in _compiled_dispatch_text()


@needs_kernel
def test_kernel_path_when_available(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    assert "moejax_expert_swiglu" in _compiled_dispatch_text()


_GENERATE = """
import json, moejax
from moejax import native
cfg = moejax.load_model_config("tiny-moe")
prompts = [[1, 2, 3, 4, 5], list(range(7, 40)), [9] * 12, list(range(100, 117))]
out = {}
for layout in ("DP1", "DP2TP2EP2"):
    model = moejax.Model.random(cfg, seed=3, layout=layout)
    engine = moejax.Engine(model, moejax.ServeConfig(max_running=4, max_model_len=64, chunk_size=16, seed=0))
    out[layout] = engine.generate(prompts, moejax.SamplingParams(max_new_tokens=12))
    out[layout + " generate"] = model.generate(prompts, max_new_tokens=12)
print(json.dumps({"native": native.available(), "tokens": out}))
"""


def _generate(switch: str) -> dict:
    env = dict(os.environ, **{native.ENV: switch})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    out = subprocess.run([sys.executable, "-c", _GENERATE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_kernel
def test_engine_greedy_tokens_identical_on_both_paths():
    xla, kernel = _generate("0"), _generate("1")
    assert (xla["native"], kernel["native"]) == (False, True)
    assert kernel["tokens"] == xla["tokens"]


@needs_kernel
def test_gemm_bench_times_the_kernel(capsys):
    from moejax.bench import gemm

    assert gemm.main(["--model", "tiny-moe", "--rows", "1,3", "--weight-mb", "0.5", "--native"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("expert SwiGLU"))) + 2:]
    assert [line.split()[0] for line in table] == ["1", "3"]
    assert all(line.split()[-2].endswith("x") for line in table)
