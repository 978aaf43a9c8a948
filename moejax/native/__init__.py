"""Native CPU kernels reached through XLA's FFI, each with a pure-XLA fallback chosen automatically.

`expert_swiglu` runs one routed expert's SwiGLU on a few rows straight from the stacked expert weights
(`expert_swiglu.cc`): XLA:CPU's dots reach 25-45% of the streaming bandwidth at 2-8 rows and copy
the expert's slice of a stacked array first (docs/benchmarks.md); the kernel reads each weight
once, in place.

The shared library is built by the package's own build (setup.py, optional: a machine without a
compiler installs without it). `available()` says whether it was built, loads, and is enabled:
MOEJAX_NATIVE=0 forces the XLA path (CI runs both), MOEJAX_NATIVE=1 enables the kernel, and unset
means the default below. Callers check `available()` at trace time, so the choice is made once per
compiled program.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

ENV = "MOEJAX_NATIVE"
# Off by default for now (MOEJAX_NATIVE=1 turns it on): the bench-moe-100m decode step took 0.70-0.77x the
# XLA path's time at batch 1 and 8 and ~0.93x at batch 32 (`python -m moejax.bench.decode --no-hf`, alternating
# rounds, 2026-12-01), and the whole suite passed on it, but one CI run of the suite with it on aborted inside
# an XLA compile (no message, not reproduced when the test ran again alone); until that is understood it is
# opt-in. CI runs the native tests with it on.
DEFAULT_ON = False
MAX_ROWS = 8  # larger row capacities stay on XLA's dot: at 16 rows the kernel took 2x its time (bench.gemm --native)
_TARGET = "moejax_expert_swiglu"


def enabled() -> bool:
    """The switch alone: MOEJAX_NATIVE ("0"/"1"), else the default."""
    value = os.environ.get(ENV, "").strip()
    return DEFAULT_ON if value == "" else value not in ("0", "false", "False", "no", "off")


@functools.cache
def _load() -> str | None:
    """Load the library and register its FFI targets; None if it is missing, or why it failed."""
    libs = sorted(Path(__file__).parent.glob("_expert_swiglu*.so"))
    if not libs:
        return "not built (no compiler at install time, or installed without the build step)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(libs[0]))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.MoejaxExpertSwiglu), platform="cpu")
    except (OSError, AttributeError) as err:
        return f"{libs[0].name} does not load: {err}"
    return None


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here (None when they can)."""
    return _load()


def available() -> bool:
    """True when the kernels are built, loaded, and switched on (MOEJAX_NATIVE=1, or the default)."""
    return enabled() and _load() is None


def use_expert_swiglu(x_CD, w) -> bool:
    """Whether `_expert_rows` should call `expert_swiglu` for these operands (checked at trace time)."""
    return (x_CD.shape[0] <= MAX_ROWS and jax.default_backend() == "cpu"
            and all(a.dtype == jnp.float32 for a in (x_CD, *w)) and available())


def expert_swiglu(x_CD, wg, wu, wd, layer, expert, count, max_threads: int = 1):
    """(silu(x @ wg[layer, expert]) * (x @ wu[layer, expert])) @ wd[layer, expert] on rows < count.

    Args:
      x_CD: float32 [C, D] rows (C: a row capacity). wg, wu: float32 [L, E, D, F]; wd: [L, E, F, D],
        the whole stacked weights (read in place, not sliced). layer, expert, count: int32 scalars,
        may be traced; indices clamp like `lax.dynamic_slice`.
      max_threads: at most this many threads of XLA's intra-op pool split F. 1 by default: on the
        shared 2-core host, 2 threads were 10-20% slower at 1-8 rows (an expert chain, 2026-12-01).
    Returns:
      float32 [C, D]; rows >= count are zero.
    """
    if _load() is not None:
        raise RuntimeError(f"moejax native kernels unavailable: {_load()}")
    scalars = (jnp.asarray(v, jnp.int32).reshape(()) for v in (layer, expert, count))
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(x_CD.shape, x_CD.dtype))
    return call(x_CD, wg, wu, wd, *scalars, max_threads=max_threads)
