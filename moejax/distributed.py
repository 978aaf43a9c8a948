"""Multi-host runs: one process per host, the same program on each (JAX's multi-controller runtime).

`initialize` starts `jax.distributed` from `--coordinator HOST:PORT --num-processes N --process-id I`
(or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). From then
on `jax.devices()` lists every process's devices, process by process, and `moejax.mesh.make_mesh`
lays the mesh over them with `device_grid`: the axes in `across_hosts` (default `data`, then `stage`)
are the ones split between processes, so `tensor` and `expert` groups, whose collectives run in
every layer, stay inside a host; when those axes have fewer groups than there are processes, the
next axes in mesh order (expert, then tensor) cross hosts too.

Invariants of a multi-host run:
- every process runs the same program with the same arguments (inputs are global arrays built from
  the same host values on each process);
- each process builds only its own devices' weight shards: `weights.place` uses
  `jax.make_array_from_callback`, which calls back for addressable shards only, so a process reads
  from the checkpoint only the slices its devices hold;
- only process 0 prints (`start` sends the others' stdout to /dev/null) and writes results;
- a result spanning processes is read with `fetch` (an all-gather), never `np.asarray`.
On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from moejax.mesh import AXES

ACROSS_HOSTS = ("data", "stage")  # the default: axes split between hosts first
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
MAX_PROCESSES = 65536

_across_hosts = ACROSS_HOSTS


@dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-host run."""

    coordinator: str  # HOST:PORT of process 0's coordinator service
    num_processes: int
    process_id: int
    across_hosts: tuple[str, ...] = ACROSS_HOSTS

    def __post_init__(self):
        parse_address(self.coordinator)
        if not 1 <= self.num_processes <= MAX_PROCESSES:
            raise ValueError(f"--num-processes must be in [1, {MAX_PROCESSES}], got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes - 1}] for {self.num_processes} "
                             f"processes, got {self.process_id}")
        parse_axes(",".join(self.across_hosts))


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); a bracketed IPv6 host is allowed ('[::1]:1234')."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--coordinator must be HOST:PORT with a port in [1, 65535], got {text!r}")
    return host, int(port)


def parse_axes(text: str) -> tuple[str, ...]:
    """'data,stage' -> ('data', 'stage'): mesh axes, each once."""
    axes = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in axes if a not in AXES]
    if bad or len(set(axes)) != len(axes):
        raise ValueError(f"--across-hosts must list distinct mesh axes from {AXES}, got {text!r}")
    return axes


# ---- command line --------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of a moejax command that runs a model."""
    g = parser.add_argument_group("multi-host (one process per host, the same command on each)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"process 0's address and a free port (default ${ENV['coordinator']}; unset: one process)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help=f"default ${ENV['num_processes']}")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process, 0 to N-1 (default ${ENV['process_id']})")
    g.add_argument("--across-hosts", type=_axes_flag, default=ACROSS_HOSTS, metavar="AXES",
                   help="mesh axes split between hosts first (default data,stage; tensor and expert stay inside "
                        "a host unless these axes are too small)")


def cluster_from(args: argparse.Namespace, environ=os.environ) -> Cluster | None:
    """The multi-host setup named by the flags (or the environment), or None for a single process.

    Raises ValueError naming the flag when the setup is incomplete or inconsistent (before JAX starts).
    """
    values = {key: getattr(args, key, None) for key in ENV}
    for key, var in ENV.items():
        if values[key] is None and environ.get(var, "") != "":
            values[key] = environ[var] if key == "coordinator" else _env_int(var, environ[var])
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return None
    missing = [k for k in ENV if values[k] is None]
    if missing:
        names = ", ".join(f"--{k.replace('_', '-')} (or ${ENV[k]})" for k in missing)
        raise ValueError(f"a multi-host run needs --coordinator, --num-processes and --process-id; missing {names}")
    return Cluster(values["coordinator"], values["num_processes"], values["process_id"],
                   tuple(getattr(args, "across_hosts", ACROSS_HOSTS)))


def start(args: argparse.Namespace, timeout_s: int = 300) -> Cluster | None:
    """Join the multi-host run the flags describe (nothing for a single process); silence stdout off process 0.

    Call before anything starts a JAX backend.
    """
    cluster = cluster_from(args)
    if cluster is not None:
        initialize(cluster, timeout_s=timeout_s)
        sys.stdout.flush()
        # Python's prints keep the real stdout on process 0 only; native writes to file descriptor 1 (gloo's
        # connection notices) go to stderr, so that stdout carries the command's output alone (e.g. --json).
        out = os.dup(1) if is_primary() else os.open(os.devnull, os.O_WRONLY)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(out, "w", buffering=1)
    return cluster


def _axes_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_axes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _env_int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${var} must be an integer, got {text!r}") from None


# ---- runtime -------------------------------------------------------------------------------------


def initialize(cluster: Cluster, timeout_s: int = 300) -> None:
    """Start JAX's distributed runtime for `cluster` and remember which mesh axes go across hosts."""
    global _across_hosts
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices: collectives across processes
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               initialization_timeout=timeout_s)
    _across_hosts = cluster.across_hosts


def is_primary() -> bool:
    """True on process 0 (the one that prints and writes), and in a single-process run."""
    import jax

    return jax.process_index() == 0


def fetch(array) -> np.ndarray:
    """The global value of `array` as numpy on every process (an all-gather when it spans processes)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def device_grid(sizes: dict[str, int], order: tuple[str, ...], devices: list) -> np.ndarray:
    """`devices` arranged as a mesh array over `order` (axis name -> size in `sizes`).

    Devices are taken process by process; the axes in `across_hosts` (then the rest in `order`) are
    laid out outermost, so they are the ones whose groups fall in different processes.
    """
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    first = [a for a in _across_hosts if a in order]
    layout_order = first + [a for a in order if a not in first]
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    grid = grid.reshape([sizes[a] for a in layout_order])
    return grid.transpose([layout_order.index(a) for a in order])
