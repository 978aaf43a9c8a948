"""Simulated CPU devices: XLA:CPU makes N devices of the host, but only if asked before JAX starts its backends.

Two ways in, one mechanism (JAX's `jax_num_cpu_devices`): `moejax.cpu_devices(n)` from Python, and the
CLI's `--devices N`. The CLI leaves an `XLA_FLAGS=--xla_force_host_platform_device_count=...` set by the
user in charge (its `--devices` has a default, a user's flag does not); `cpu_devices` is always explicit
and wins. Neither changes anything on GPU platforms. Simulated devices share the host's cores: they prove
correctness and communication volume, never speed.
"""

from __future__ import annotations

import os

MAX_SIMULATED_DEVICES = 1024  # XLA:CPU makes this many devices at start-up: a bound keeps start-up bounded
_XLA_FLAG = "xla_force_host_platform_device_count"


def cpu_devices(n: int) -> list:
    """Make JAX's CPU platform `n` simulated devices and return them (`jax.devices("cpu")`).

    Call it first, right after `import moejax` and before anything runs on JAX: the count is fixed when
    JAX starts its backends. On a GPU host the CPU devices exist beside the GPUs; `moejax.load` and
    `make_mesh` use `jax.devices()` (the GPUs there) unless given devices.

    Raises:
      ValueError: `n` is not an integer in [1, 1024].
      RuntimeError: JAX already started with a different number of CPU devices (call it earlier, or in a
        fresh process).
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SIMULATED_DEVICES:
        raise ValueError(f"cpu_devices: n must be an integer in [1, {MAX_SIMULATED_DEVICES}], got {n!r}")
    import jax

    _request(n)
    have = jax.devices("cpu")
    if len(have) != n:
        raise RuntimeError(f"moejax.cpu_devices({n}): JAX already started with {len(have)} CPU devices, so the "
                           f"count can no longer change; call moejax.cpu_devices({n}) before any JAX computation "
                           f"(right after `import moejax`), or in a fresh process")
    return have


def request_cpu_devices(n: int) -> bool:
    """The CLI's `--devices N`: ask for `n` CPU devices unless XLA_FLAGS already sets the count.

    Returns False when XLA_FLAGS sets it (then `n` is not applied and the caller's hint names XLA_FLAGS).
    After JAX has started, the count stays what it is; the caller compares it with what the layout needs.
    """
    if _XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
        return False
    _request(n)
    return True


def _request(n: int) -> None:
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX's backends already started: the count is fixed (callers check it)
        pass
