"""ServeConfig and Engine construction refuse bad values with one clear message, before any device work;
pools and weights that cannot fit in device memory are refused with the numbers, before allocation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moejax
from moejax import Engine, ServeConfig, fit
from tests.engine.conftest import base_config

BAD_CONFIG = [
    ({"max_running": 0}, r"ServeConfig.max_running must be at least 1, got 0; allowed: integers in \[1, 2147483647\]"),
    ({"max_running": True}, r"ServeConfig.max_running must be an integer \(booleans are not numbers\), got True"),
    ({"max_running": 8.0}, r"ServeConfig.max_running must be an integer, got 8.0"),
    ({"page_size": -4}, r"ServeConfig.page_size must be at least 1, got -4"),
    ({"page_size": np.float32(16)}, r"ServeConfig.page_size must be an integer, got np.float32\(16.0\)"),
    ({"num_pages": 2**31}, r"ServeConfig.num_pages must be at most 2147483647, got 2147483648"),
    ({"num_pages": None}, r"ServeConfig.num_pages must be an integer, got None"),
    ({"chunk_size": "64"}, r"ServeConfig.chunk_size must be an integer, got '64'"),
    ({"chunk_size": 0}, r"ServeConfig.chunk_size must be at least 1, got 0"),
    ({"max_prefill_seqs": 0}, r"ServeConfig.max_prefill_seqs must be at least 1, got 0"),
    ({"max_prefill_seqs": np.bool_(True)}, r"max_prefill_seqs must be an integer \(booleans are not numbers\)"),
    ({"max_model_len": 0}, r"ServeConfig.max_model_len must be at least 1, got 0; .* or None"),
    ({"max_model_len": False}, r"ServeConfig.max_model_len must be an integer \(booleans are not numbers\)"),
    ({"max_model_len": 64.5}, r"ServeConfig.max_model_len must be an integer, got 64.5"),
    ({"decode_buckets": ()}, r"ServeConfig.decode_buckets must be a non-empty tuple of batch sizes .*, got \(\)"),
    ({"decode_buckets": 8}, r"ServeConfig.decode_buckets must be a non-empty tuple .*, got 8"),
    ({"decode_buckets": "48"}, r"ServeConfig.decode_buckets must be a non-empty tuple .*, got '48'"),
    ({"decode_buckets": (4, 0)}, r"ServeConfig.decode_buckets\[1\] must be at least 1, got 0"),
    ({"decode_buckets": (2, 2.5)}, r"ServeConfig.decode_buckets\[1\] must be an integer, got 2.5"),
    ({"seed": -1}, r"ServeConfig.seed must be at least 0, got -1; allowed: integers in \[0, 4294967295\]"),
    ({"seed": 2**32}, r"ServeConfig.seed must be at most 4294967295, got 4294967296"),
    ({"seed": 1.0}, r"ServeConfig.seed must be an integer, got 1.0"),
    ({"max_finished_retained": -1}, r"ServeConfig.max_finished_retained must be at least 0, got -1"),
    ({"max_finished_retained": None}, r"ServeConfig.max_finished_retained must be an integer, got None"),
    ({"microbatches": 0}, r"ServeConfig.microbatches must be at least 1, got 0; .* or None: one per pipeline stage"),
    ({"microbatches": 2.0}, r"ServeConfig.microbatches must be an integer, got 2.0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIG, ids=[str(kw) for kw, _ in BAD_CONFIG])
def test_bad_serve_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_numpy_integers_are_accepted_as_python_ints():
    c = ServeConfig(max_running=np.int64(8), page_size=np.int32(16), num_pages=np.uint16(64),
                    max_model_len=np.int64(128), decode_buckets=[np.int8(4), 8], seed=np.uint32(2**32 - 1),
                    max_finished_retained=np.int64(0))
    assert (c.max_running, c.page_size, c.num_pages, c.max_model_len, c.seed) == (8, 16, 64, 128, 2**32 - 1)
    assert c.decode_buckets == (4, 8) and all(type(b) is int for b in c.decode_buckets)
    assert type(c.max_running) is int and type(c.seed) is int and type(c.max_finished_retained) is int
    assert ServeConfig(max_model_len=None, decode_buckets=None).max_model_len is None


@pytest.fixture
def model(engine_model):
    if engine_model.layout.data == 1:
        pytest.skip("construction checks: one layout is enough")
    return engine_model


BAD_ENGINE = [
    ({"max_running": 3, "decode_buckets": None},
     r"max_running \(3\) must be a multiple of the data groups \(4 = data 2 x expert 2, expert mode 'dp_attention'\)"),
    ({"decode_buckets": (1,)}, r"decode_buckets \(1,\) must reach the slots per data group and microbatch group "
                               r"\(2 = max_running / \(data groups x microbatches\)\)"),
    ({"microbatches": 4}, r"max_running \(8\) must be a multiple of the data groups \(4 = .*\) of layout DP2TP2EP2 "
                          r"times microbatches \(4\): e.g. 16"),
    ({"max_model_len": 5000}, r"max_model_len \(5000\) exceeds the model's max_position_embeddings \(1024\)"),
    ({"num_pages": 2**30}, r"num_pages \(1073741824\) times data groups \(4\) exceeds 2\*\*31 - 1 pages"),
    ({"num_pages": 2**28}, r"the KV cache \(268435456 pages of 4 tokens per data group\) needs 384.00 GiB per "
                           r"device but \d+\.\d\d GiB are available \(on each of 8 cpu devices\); lower "
                           r"ServeConfig.num_pages"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_ENGINE, ids=[str(kw) for kw, _ in BAD_ENGINE])
def test_engine_refuses_before_allocating(model, overrides, message):
    before = len(jax.live_arrays())
    with pytest.raises(ValueError, match=message) as refused:
        Engine(model, base_config(model, **overrides))
    # The traceback keeps the half-built engine alive: any pools it had made would still be counted.
    assert refused.traceback and len(jax.live_arrays()) == before, "device arrays were allocated before refusing"


def test_engine_refuses_a_config_of_another_type(model):
    with pytest.raises(ValueError, match="config must be a ServeConfig, got dict"):
        Engine(model, {"max_running": 8})


def test_byte_counts_are_exact(engine_model, engines):
    """The per-device needs the checks use equal what is really on each device."""
    engine = engines(engine_model)
    pools = jax.tree.leaves(engine.cache)
    on_device = sum(a.addressable_shards[0].data.nbytes for a in pools)
    assert fit.kv_cache_bytes(engine_model.steps, engine.config.num_pages * engine.groups, engine.config.page_size,
                              engine_model.dtype) \
        == on_device
    mesh = engine_model.mesh
    with jax.set_mesh(mesh):
        abstract = moejax.weights.abstract_model(engine_model.cfg, engine_model.par, engine_model.dtype)
    first = mesh.devices.flat[0]
    placed = sum(s.data.nbytes for a in jax.tree.leaves(engine_model.params) for s in a.addressable_shards
                 if s.device == first)
    assert fit.weight_bytes(abstract, mesh) == placed


def test_model_too_big_for_the_host_is_refused_before_placing(monkeypatch):
    cfg = moejax.load_model_config("mixtral-8x7b")

    def no_placement(*args, **kwargs):
        raise AssertionError("weights were placed before the model was refused")

    monkeypatch.setattr(moejax.inference, "place", no_placement)
    free = fit.available_bytes(jax.devices()[:1])
    if free is not None and free > 200 * fit.GiB:
        pytest.skip("this host has room for mixtral-8x7b in float32")
    with pytest.raises(ValueError, match=r"model mixtral-8x7b \(its weights\) needs 17\d\.\d\d GiB per device but "
                                         r"\d+\.\d\d GiB are available \(on each of 1 cpu device\); use a layout"):
        moejax.Model.random(cfg, layout="DP1")


class _Accelerator:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_available_bytes_per_backend():
    gib = fit.GiB
    gpus = [_Accelerator({"bytes_limit": 10 * gib, "bytes_in_use": 3 * gib}),
            _Accelerator({"bytes_limit": 10 * gib, "bytes_in_use": 6 * gib})]
    assert fit.available_bytes(gpus) == 4 * gib  # the least free over the devices in use
    assert fit.available_bytes([_Accelerator(None)]) is None  # unknown: the check is skipped
    fit.check_fits("x", 10**15, [_Accelerator({})], "hint")
    with pytest.raises(ValueError, match=r"the pools needs 5.00 GiB per device but 4.00 GiB are available "
                                         r"\(on each of 2 gpu devices\); shrink them"):
        fit.check_fits("the pools", 5 * gib, gpus, "shrink them")
    fit.check_fits("the pools", 4 * gib, gpus, "shrink them")



def test_cpu_devices_share_the_host_memory(monkeypatch):
    assert fit._host_available_bytes() > 0
    monkeypatch.setattr(fit, "_host_available_bytes", lambda: 8 * fit.GiB)
    cpus = jax.devices()
    assert fit.available_bytes(cpus[:1]) == 8 * fit.GiB and fit.available_bytes(cpus) == fit.GiB
    with pytest.raises(ValueError, match=r"needs 1.50 GiB per device but 1.00 GiB are available \(on each of 8 cpu"):
        fit.check_fits("the pools", 3 * fit.GiB // 2, cpus, "shrink them")
