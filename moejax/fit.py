"""Will it fit? Bytes needed per device against bytes available, checked before anything is allocated.

Needs are exact per-device byte counts derived from shapes and shardings (no arrays are made):
weights from the abstract model's parameters and their declared logical axes, the KV pools from an
abstract trace of `Steps.new_cache`.
Availability: an accelerator reports `memory_stats()` (`bytes_limit - bytes_in_use`, the least
over the devices in use). CPU devices report nothing, and all of them share the host's RAM, so a
CPU device gets the host's available memory (`MemAvailable`) divided among the devices in use.
Memory already taken (weights placed earlier, other processes) is therefore not counted twice.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx

from moejax.kv_cache import pool_parts

GiB = 2**30


def available_bytes(devices) -> int | None:
    """Bytes free per device for an allocation spread over `devices`; None when the backend cannot tell."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        host = _host_available_bytes()
        return None if host is None else host // len(devices)
    free = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)


def check_fits(what: str, bytes_per_device: int, devices, hint: str) -> None:
    """Raise ValueError when `bytes_per_device` exceeds what each of `devices` has free (no-op when unknown)."""
    devices = list(devices)
    free = available_bytes(devices)
    if free is not None and bytes_per_device > free:
        where = f"{len(devices)} {devices[0].platform} device{'s' * (len(devices) > 1)}"
        raise ValueError(f"{what} needs {bytes_per_device / GiB:.2f} GiB per device but {free / GiB:.2f} GiB are "
                         f"available (on each of {where}); {hint}")


def sharded_bytes(shape: tuple[int, ...], dtype, named_sharding: jax.sharding.NamedSharding) -> int:
    """Bytes of one device's shard of an array of `shape` and `dtype` placed with `named_sharding` (int4, fp4: half a
    byte per value, as XLA packs it)."""
    values = math.prod(named_sharding.shard_shape(tuple(shape)))
    return -(-values // 2) if np.dtype(dtype).name in ("int4", "float4_e2m1fn") else values * np.dtype(dtype).itemsize


def weight_bytes(module, mesh: jax.sharding.Mesh) -> int:
    """Bytes per device of a (possibly abstract) module's parameters, each in its declared sharding."""
    _, state = nnx.split(module)
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = var.get_value()
        total += sharded_bytes(value.shape, value.dtype, module.par.named(mesh, var.get_metadata()["out_sharding"]))
    return total


def check_weights_fit(module, mesh: jax.sharding.Mesh) -> None:
    """Refuse (ValueError with the numbers) to place `module`'s weights on `mesh` when they cannot fit."""
    check_fits(f"model {module.cfg.name or module.cfg.family} (its weights)", weight_bytes(module, mesh),
               mesh.devices.flat, "use a layout that splits the weights over more devices (tensor, expert or "
               "stage), a narrower dtype (e.g. bfloat16) or a smaller model")


def kv_cache_bytes(steps, num_pages: int, page_size: int, dtype) -> int:
    """Bytes per device of the KV pools `steps.new_cache(num_pages, page_size, dtype)` would allocate
    (`moejax.steps.Steps`; `dtype` a float dtype or a quantized KV cache dtype, "fp8" / "int8").

    The pools' shapes come from tracing `new_cache` abstractly (nothing is allocated); each pool is laid out by
    the attention kind's axes (`Steps.cache_axes`: pages over the batch shards, kv heads over `tensor` (an MLA
    latent is replicated over it), layers over `stage`); a quantized pool's scales are counted with its values.
    """
    pools = jax.eval_shape(lambda: steps.new_cache(num_pages, page_size, dtype))
    return sum(sharded_bytes(part.shape, part.dtype, steps.named(part_axes))
               for pool, axes in zip(pools, steps.cache_axes, strict=True)
               for part, part_axes in pool_parts(pool, axes))


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
