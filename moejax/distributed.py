"""Multi-host runs: one process per host, the same program on each (JAX's multi-controller runtime).

`start` joins the run named by `--coordinator HOST:PORT --num-processes N --process-id I` (or the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) in two steps:

1. `moejax.rendezvous`, before JAX starts: every process meets process 0 on the coordinator's port
   and shows a fingerprint of its command; process 0 answers once all N joined, or every process
   that joined ends with the same one line (a process id claimed twice, a different command, the
   ids that did not join within `--coordinator-timeout`). A process that cannot reach process 0
   gives up after the same timeout.
2. `jax.distributed.initialize`, which then only starts the runtime of processes known to be there;
   a watchdog still ends the process with one line if it does not return within the timeout (past
   its own timeout JAX aborts the process with a C++ stack that Python cannot catch).

From then on `jax.devices()` lists every process's devices, process by process, and
`moejax.mesh.make_mesh` takes the same number from each (`take_devices`) and lays the mesh over
them with `device_grid`: the axes in `across_hosts` (default `data`, then `stage`) are the ones
split between processes, so `tensor` and `expert` groups, whose collectives run in every layer,
stay inside a host; when those axes have fewer groups than there are processes, the next axes in
mesh order (expert, then tensor) cross hosts too.

Invariants of a multi-host run:
- every process runs the same program with the same arguments (checked by the rendezvous; inputs
  are global arrays built from the same host values on each process);
- every process holds the same number of the mesh's devices; simulated CPU devices (`--devices N`)
  count for the whole run, N / num_processes (rounded up) made by each process;
- each process builds only its own devices' weight shards: `weights.place` builds
  only the shards of the sharding's addressable devices (`_assemble`), so a process reads
  from the checkpoint only the slices its devices hold;
- only process 0 prints (`start` sends the others' stdout to /dev/null) and writes results;
- a result spanning processes is read with `fetch` (an all-gather), never `np.asarray`.
On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`); its connection
notices (written to file descriptor 1) are dropped unless `--debug`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from moejax.axes import AXES
from moejax.rendezvous import ClusterError, rendezvous

__all__ = ["Cluster", "ClusterError", "add_flags", "cluster_from", "device_grid", "fetch", "initialize", "is_primary",
           "local_device_count", "start", "take_devices"]

ACROSS_HOSTS = ("data", "stage")  # the default: axes split between hosts first
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
MAX_PROCESSES = 65536
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 86400.0

_ERROR = "moejax: error: "  # the CLI's one-line form, for the watchdog that cannot raise
_JAX_GRACE_S = 30  # JAX's own start-up timeout exceeds the watchdog's, so the watchdog speaks first

_across_hosts = ACROSS_HOSTS


@dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-host run."""

    coordinator: str  # HOST:PORT of process 0's coordinator service
    num_processes: int
    process_id: int
    across_hosts: tuple[str, ...] = ACROSS_HOSTS
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a process waits for the others (--coordinator-timeout)

    def __post_init__(self):
        parse_address(self.coordinator)
        if not 1 <= self.num_processes <= MAX_PROCESSES:
            raise ValueError(f"--num-processes must be in [1, {MAX_PROCESSES}], got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes - 1}] for {self.num_processes} "
                             f"processes, got {self.process_id}")
        parse_axes(",".join(self.across_hosts))
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"--coordinator-timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                             f"got {self.timeout_s!r}")


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
    g = parser.add_argument_group("multi-host", "one process per host, the same command on each (only --process-id "
                                  "changes); simulated CPU devices: --devices is the run's total, split evenly "
                                  "between the processes")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"process 0's address and a free port (default ${ENV['coordinator']}; unset: one process)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help=f"default ${ENV['num_processes']}")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process, 0 to N-1 (default ${ENV['process_id']})")
    g.add_argument("--across-hosts", type=_axes_flag, default=ACROSS_HOSTS, metavar="AXES",
                   help="mesh axes split between hosts first (default data,stage; tensor and expert stay inside "
                        "a host unless these axes are too small)")
    g.add_argument("--coordinator-timeout", type=_timeout_flag, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long each process waits for the others to join before every process ends with "
                        f"one line naming the missing ones (default {DEFAULT_TIMEOUT_S:g})")


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
                   tuple(getattr(args, "across_hosts", ACROSS_HOSTS)),
                   getattr(args, "coordinator_timeout", DEFAULT_TIMEOUT_S))


def local_device_count(cluster: Cluster | None, total: int, layout_size: int) -> int:
    """The simulated CPU devices this process makes: its share of the run's `total` (`--devices`), rounded up.

    Raises ValueError when the layout's size does not split evenly between the processes (every process
    must hold the same number of the mesh's devices). A `total` that does not split is rounded up rather
    than refused: on a GPU host, or with XLA_FLAGS setting the count, it is not used at all.
    """
    if cluster is None:
        return total
    n = cluster.num_processes
    if layout_size % n:
        raise ValueError(f"the layout's {layout_size} devices do not split evenly between {n} processes (each "
                         f"process holds the same number of them); choose a layout whose size is a multiple of {n}")
    return -(-total // n)


def start(cluster: Cluster | None, fingerprint: dict | None = None, shared: dict | None = None,
          debug: bool = False) -> dict:
    """Join the multi-host run `cluster` (nothing for a single process); silence stdout off process 0.

    Call before anything starts a JAX backend. Every process sends `fingerprint` (what must be the same
    on every process: name -> JSON-able value) to process 0, which refuses a difference. Returns process
    0's `shared` (values that process 0 chose, such as a drawn seed), the same dict on every process;
    for a single process, `shared` itself.

    Raises:
      ClusterError: a peer did not join within `cluster.timeout_s`, the coordinator cannot be reached,
        a process id is claimed twice, or the processes run different commands (one line each).
    """
    shared = dict(shared or {})
    if cluster is None:
        return shared
    shared = rendezvous(cluster, fingerprint or {}, shared)
    initialize(cluster)
    sys.stdout.flush()
    # Python's prints keep the real stdout on process 0 only. Native writes to file descriptor 1 are
    # gloo's connection notices (a line per communicator): dropped, or on stderr with --debug, so that
    # stdout carries the command's output alone (e.g. --json).
    out = os.dup(1) if is_primary() else os.open(os.devnull, os.O_WRONLY)
    native = os.dup(2) if debug else os.open(os.devnull, os.O_WRONLY)
    os.dup2(native, 1)
    os.close(native)
    sys.stdout = os.fdopen(out, "w", buffering=1)
    return shared


def _axes_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_axes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _timeout_flag(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {text!r}")
    return value


def _env_int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${var} must be an integer, got {text!r}") from None


# ---- runtime -------------------------------------------------------------------------------------


def initialize(cluster: Cluster) -> None:
    """Start JAX's distributed runtime for `cluster` and remember which mesh axes go across hosts.

    A watchdog ends the process with one line if JAX does not start within `cluster.timeout_s`: past
    its own timeout JAX aborts the process with a C++ stack, which Python cannot catch.
    """
    global _across_hosts
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices: collectives across processes
    message = (f"{_ERROR}process {cluster.process_id}: JAX's distributed runtime did not start within "
               f"{cluster.timeout_s:g} s although every process joined (coordinator {cluster.coordinator}); a "
               f"process may have ended, or a firewall lets the rendezvous through but not JAX's service\n")
    watchdog = threading.Timer(cluster.timeout_s, _abort, (message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                                   initialization_timeout=math.ceil(cluster.timeout_s) + _JAX_GRACE_S)
    finally:
        watchdog.cancel()
    _across_hosts = cluster.across_hosts


def _abort(message: str) -> None:
    os.write(2, message.encode())
    os._exit(2)


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


def take_devices(devices: list, n: int) -> list:
    """`n` of `devices`, the same number from every process (the first ones of each by id), process by process.

    Raises ValueError when `n` does not split evenly between the processes or a process has too few.
    """
    by_process: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    share, rest = divmod(n, len(by_process))
    fewest = min(len(v) for v in by_process.values())
    if rest or share == 0 or fewest < share:
        raise ValueError(f"a mesh of {n} devices over {len(by_process)} processes needs the same number from each "
                         f"(every process runs the program); " +
                         (f"{n} does not split evenly" if rest or share == 0 else
                          f"a process has only {fewest} devices, {share} needed"))
    return [d for group in by_process.values() for d in group[:share]]


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
