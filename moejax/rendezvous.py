"""The rendezvous of a multi-host run: every process meets process 0 on the coordinator's port before JAX starts.

Process 0 listens on the port of `--coordinator HOST:PORT` (on every address, as JAX's service will),
and first connects to HOST:PORT itself: it must come back to its own listener, since every other
process looks for it there. Each other process connects (retrying until its timeout) and sends one
JSON line, its hello: process id, number of processes, host name, a fingerprint of its command (flag
-> canonical JSON text) and what it would share. Process 0 answers every process with one JSON line
when all have joined (carrying its own `shared` values), or refuses the run at the first problem: a
process id claimed twice, a different number of processes, a different fingerprint (naming the flags),
or processes missing at the deadline (naming their ids). Each process then raises the same
`ClusterError`, so every started process ends with the same one line. Process 0 closes the port before
JAX's coordination service binds it; a joined process closes its connection first, so that no
connection of the rendezvous lingers on that port.

Why not JAX alone: `jax.distributed.initialize` waits for a missing process for its whole
`initialization_timeout` and then aborts the process with a C++ `Check failure` stack, which Python
cannot catch, and names no process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import secrets
import selectors
import socket
import time

_PROTOCOL = "moejax-rendezvous/1"
_CONNECT_S = 5.0  # one connection attempt; a process retries until its timeout
_PROBE_S = 5.0  # process 0's own connection to HOST:PORT must reach it within this
_HELLO_S = 5.0  # a connection that says nothing within this is not a moejax process: dropped
_REPLY_GRACE_S = 5.0  # a joined process waits the timeout plus this for process 0's answer
_MAX_LINE = 1 << 20
_SHOWN_VALUE = 60  # fingerprint values longer than this are compared by hash and named, not shown


class ClusterError(ValueError):
    """A multi-host run that cannot start (the CLI prints it as one line `moejax: error: ...`, exit 2)."""


def fingerprint_of(values: dict) -> dict[str, str]:
    """name -> canonical JSON text of each value; long ones as a hash (compared, named, not shown)."""
    out = {}
    for name, value in values.items():
        text = json.dumps(value, sort_keys=True, default=str)
        if len(text) > _SHOWN_VALUE:
            text = f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]} ({len(text)} characters)"
        out[str(name)] = text
    return out


def rendezvous(cluster, fingerprint: dict, shared: dict | None = None) -> dict:
    """Meet every process of `cluster` (a `moejax.distributed.Cluster`) on the coordinator's port before JAX starts.

    `fingerprint` (name -> JSON-able value) must be the same on every process; `shared` is what process
    0 hands to every process. Returns process 0's `shared`.

    Raises:
      ClusterError: the same line on every process that joined (see the module docstring).
    """
    hello = {"protocol": _PROTOCOL, "process_id": cluster.process_id, "num_processes": cluster.num_processes,
             "host": socket.gethostname(), "nonce": secrets.token_hex(8), "fingerprint": fingerprint_of(fingerprint),
             "shared": shared or {}}
    deadline = time.monotonic() + cluster.timeout_s
    if cluster.process_id == 0:
        listener = _listen(cluster)
        if listener is not None:
            return _Coordinator(cluster, hello, deadline, listener).run()
        # The port is taken: maybe by process 0 of this run, started twice (it then refuses the run).
        _join(cluster, hello, time.monotonic() + _CONNECT_S, port_taken=True)
    return _join(cluster, hello, deadline)


def _host(cluster) -> tuple[str, int]:
    """(host, port) of the coordinator, an IPv6 host without its brackets (the address is checked by Cluster)."""
    host, _, port = cluster.coordinator.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _line(message: dict) -> bytes:
    return (json.dumps(message) + "\n").encode()


def _ids(ids) -> str:
    """[1, 2, 3, 5, 6, 9] -> '1-3, 5, 6, 9'."""
    ids, runs = sorted(ids), []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a + 1 else ", ".join(map(str, range(a, b + 1))) for a, b in runs)


def _listen(cluster) -> socket.socket | None:
    """Process 0's listening socket on every address of the coordinator's port (as JAX's service binds
    it), or None when the port is in use."""
    _, port = _host(cluster)
    last = None
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            last = err
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of an earlier run may linger
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.listen(128)
            return sock
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                return None
            last = err
    raise ClusterError(f"--coordinator {cluster.coordinator}: process 0 cannot listen on port {port} "
                       f"({getattr(last, 'strerror', None) or last}); choose another port")


def _join(cluster, hello: dict, deadline: float, port_taken: bool = False) -> dict:
    """A process other than 0: connect to the coordinator (retrying until `deadline`), say hello, await
    the verdict. Returns process 0's `shared`."""
    host, port = _host(cluster)
    me, addr, last = f"process {cluster.process_id}", cluster.coordinator, "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if port_taken:
                raise ClusterError(f"--coordinator {addr}: port {port} is in use on this host, and what holds it "
                                   f"does not answer ({last}); choose another port")
            raise ClusterError(f"{me} could not reach the coordinator (process 0) at {addr} within "
                               f"{cluster.timeout_s:g} s ({last}); start process 0 there with the same command, "
                               f"or check --coordinator (process 0's host and port)")
        try:
            sock = socket.create_connection((host, port), timeout=min(remaining, _CONNECT_S))
            break
        except socket.gaierror as err:
            raise ClusterError(f"--coordinator {addr}: cannot resolve host {host!r} ({err.strerror})") from None
        except OSError as err:
            last = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    with sock:
        sock.sendall(_line(hello))
        reply = _read_reply(sock, _HELLO_S if port_taken else cluster.timeout_s + _REPLY_GRACE_S)
    if reply is None or reply.get("protocol") != _PROTOCOL:
        what = "nothing" if reply is None else "something else"
        if port_taken:
            raise ClusterError(f"--coordinator {addr}: port {port} is in use on this host by another program "
                               f"(it answered {what} to process 0's hello); choose another port")
        raise ClusterError(f"{me}: {addr} answered {what}, not as a moejax process 0 waiting for its processes "
                           f"would: process 0 ended (see its message), or a run that already has all its "
                           f"processes (is this one too many?) or another program holds that port")
    if "error" in reply:
        raise ClusterError(str(reply["error"]))
    if port_taken:  # a moejax process 0 never accepts a second process 0
        raise ClusterError(f"--coordinator {addr}: port {port} is in use by another moejax run")
    return dict(reply.get("shared", {}))


def _read_reply(sock: socket.socket, timeout_s: float) -> dict | None:
    """One JSON line from `sock` within `timeout_s`; None on end of stream, timeout or anything else."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\n" not in data and len(data) < _MAX_LINE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        message = json.loads(data.split(b"\n")[0])
    except (OSError, ValueError):
        return None
    return message if isinstance(message, dict) else {}


class _Coordinator:
    """Process 0's side of the rendezvous: one thread, a selector over the listener and the connections."""

    def __init__(self, cluster, hello: dict, deadline: float, listener: socket.socket):
        self.cluster, self.hello, self.deadline, self.listener = cluster, hello, deadline, listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, "listen")
        self.joined = {0: hello["host"]}  # process id -> the host it joined from
        self.conns = {}  # accepted socket -> [bytes received, time accepted, process id once it joined]
        self.probe = None

    def run(self) -> dict:
        try:
            self._start_probe()
            probe_deadline = time.monotonic() + _PROBE_S
            while self.probe is not None or len(self.joined) < self.cluster.num_processes:
                now = time.monotonic()
                if self.probe is not None and now >= probe_deadline:
                    raise ClusterError(f"--coordinator {self.cluster.coordinator} leads to another host or "
                                       f"program, not to process 0 (this process): give process 0's own address")
                if now >= self.deadline:
                    raise ClusterError(self._missing())
                wait = min(self.deadline, probe_deadline if self.probe is not None else math.inf) - now
                for key, _ in self.selector.select(min(wait, 1.0)):
                    self._on_event(key.data, key.fileobj)
                self._drop_silent()
            self._answer({"protocol": _PROTOCOL, "shared": self.hello["shared"]})
            return dict(self.hello["shared"])
        except ClusterError as err:
            self._answer({"protocol": _PROTOCOL, "error": str(err)})
            raise
        finally:
            for sock in [*self.conns, self.listener] + ([self.probe] if self.probe else []):
                sock.close()
            self.selector.close()

    def _start_probe(self) -> None:
        """Connect to HOST:PORT as the others will: it must lead back to this listener."""
        host, port = _host(self.cluster)
        addr = self.cluster.coordinator
        try:
            self.probe = socket.create_connection((host, port), timeout=min(_PROBE_S, self.cluster.timeout_s))
        except socket.gaierror as err:
            raise ClusterError(f"--coordinator {addr}: cannot resolve host {host!r} ({err.strerror})") from None
        except OSError as err:
            why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
            raise ClusterError(f"--coordinator {addr}: process 0 (this process) runs the coordinator but cannot "
                               f"reach {addr} ({why}); give process 0's own address") from None
        self.probe.sendall(_line(self.hello))
        self.selector.register(self.probe, selectors.EVENT_READ, "probe")

    def _on_event(self, what: str, sock: socket.socket) -> None:
        if what == "listen":
            conn, _ = sock.accept()
            conn.setblocking(False)
            self.conns[conn] = [b"", time.monotonic(), None]
            self.selector.register(conn, selectors.EVENT_READ, "peer")
        elif what == "probe":  # our hello reached someone else, who answered: another moejax process 0?
            reply = _read_reply(sock, _HELLO_S) or {}
            raise ClusterError(str(reply.get("error") or f"--coordinator {self.cluster.coordinator} leads to "
                                                           f"another host or program, not to process 0 (this "
                                                           f"process): give process 0's own address"))
        else:
            self._on_data(sock)

    def _on_data(self, conn: socket.socket) -> None:
        state = self.conns[conn]
        try:
            chunk = conn.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:  # the other side left (a process that joined and then ended no longer counts)
            self._close(conn)
            return
        state[0] += chunk
        if b"\n" in state[0] and state[2] is None:
            try:
                hello = json.loads(state[0].split(b"\n")[0])
            except ValueError:
                hello = None
            if not isinstance(hello, dict) or hello.get("protocol") != _PROTOCOL:
                self._close(conn)  # not a moejax process
                return
            self._check(conn, hello)
        elif len(state[0]) > _MAX_LINE:
            self._close(conn)

    def _check(self, conn: socket.socket, hello: dict) -> None:
        """Accept a process's hello, or refuse the run naming what is wrong."""
        n, pid = self.cluster.num_processes, hello.get("process_id")
        if pid == 0 and hello.get("nonce") == self.hello["nonce"]:  # our own probe: HOST:PORT leads here
            self.selector.unregister(self.probe)
            self.probe.close()  # the connecting side closes first: no TIME_WAIT on the coordinator's port
            self.probe = None
            self._close(conn)
            return
        if hello.get("num_processes") != n:
            raise ClusterError(f"process {pid} has --num-processes {hello.get('num_processes')} but process 0 has "
                               f"{n}; run the same command on every process (only --process-id changes)")
        if not isinstance(pid, int) or not 0 <= pid < n:
            raise ClusterError(f"a process joined with --process-id {pid!r}, outside [0, {n - 1}]")
        if pid in self.joined:
            raise ClusterError(f"two processes claim --process-id {pid} (hosts {self.joined[pid]} and "
                               f"{hello.get('host')}); give each process its own id in [0, {n - 1}]")
        differences = _differences(self.hello["fingerprint"], hello.get("fingerprint") or {})
        if differences:
            raise ClusterError(f"process {pid} runs a different command from process 0 ({'; '.join(differences)}); "
                               f"run the same command on every process (only --process-id changes)")
        self.joined[pid] = hello.get("host")
        self.conns[conn][2] = pid

    def _close(self, conn: socket.socket) -> None:
        pid = self.conns.pop(conn)[2]
        if pid is not None:
            del self.joined[pid]
        self.selector.unregister(conn)
        conn.close()

    def _drop_silent(self) -> None:
        now = time.monotonic()
        for conn, (_, since, pid) in list(self.conns.items()):
            if pid is None and now - since > _HELLO_S:
                self._close(conn)

    def _missing(self) -> str:
        n = self.cluster.num_processes
        missing = sorted(set(range(n)) - set(self.joined))
        if not missing:  # everyone joined, but process 0's own probe never came back
            return f"--coordinator {self.cluster.coordinator} does not lead back to process 0 (this process)"
        s = "es" if len(missing) > 1 else ""
        return (f"process{s} {_ids(missing)} of {n} did not join within {self.cluster.timeout_s:g} s (joined: "
                f"{_ids(self.joined)}; coordinator {self.cluster.coordinator}); start every process with the same "
                f"command (only --process-id changes) and --coordinator, or raise --coordinator-timeout")

    def _answer(self, reply: dict) -> None:
        """Send `reply` to the processes that joined (a refusal: to every connection, a process whose hello
        is still on its way included), then let them close first (so the port that JAX's service binds next
        keeps no connection of ours in TIME_WAIT). A connection not told goes at the end: one more process
        (the run is complete without it) sees that and gives up."""
        for conn, (_, _, pid) in list(self.conns.items()):
            if pid is None and "error" not in reply:
                self._close(conn)
                continue
            try:
                conn.setblocking(True)
                conn.settimeout(1.0)
                conn.sendall(_line(reply))
            except OSError:
                self._close(conn)
        end = time.monotonic() + 2.0
        for conn in list(self.conns):
            try:
                conn.settimeout(max(0.01, end - time.monotonic()))
                while conn.recv(65536):
                    pass
            except OSError:
                pass


def _differences(mine: dict, theirs: dict) -> list[str]:
    out = []
    for name in sorted(set(mine) | set(theirs), key=lambda k: (list(mine) + list(theirs)).index(k)):
        a, b = mine.get(name), theirs.get(name)
        if a == b:
            continue
        if a is None or b is None or a.startswith("sha256:") or b.startswith("sha256:"):
            out.append(f"different {name}")
        else:
            out.append(f"{name} {_shown(a)} vs {_shown(b)}")
    return out


def _shown(text: str) -> str:
    value = json.loads(text)
    return value if isinstance(value, str) else text
