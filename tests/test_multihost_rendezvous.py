"""The rendezvous protocol in one process: each "process" a thread, on loopback (no JAX runtime).

The subprocess cases of tests/test_multihost_errors.py cover what a user sees; these cover what they
cannot observe cheaply: process 0's shared values reach every process, long values are compared by
hash, a connection that is not a moejax process is ignored, a process that joined and left is missing.
"""

import json
import socket
import threading

import pytest

from moejax.distributed import Cluster, ClusterError
from moejax.rendezvous import _PROTOCOL, rendezvous


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meet(port: int, members: list[tuple[int, int, dict, dict]], timeout_s: float = 20) -> list:
    """Run the rendezvous of each (process id, num processes, fingerprint, shared) in a thread; the result
    of each: process 0's shared dict, or the ClusterError's message."""
    results = [None] * len(members)

    def one(i, pid, n, fingerprint, shared):
        try:
            results[i] = rendezvous(Cluster(f"127.0.0.1:{port}", n, pid, timeout_s=timeout_s), fingerprint, shared)
        except ClusterError as err:
            results[i] = str(err)

    threads = [threading.Thread(target=one, args=(i, *m)) for i, m in enumerate(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_every_process_gets_process_0s_shared_values():
    fp = {"--layout": "TP2", "prompts": [[1, 2, 3]] * 40}  # a long value too: compared by hash
    results = _meet(_free_port(), [(0, 3, fp, {"sample_seed": 7}), (1, 3, fp, {"sample_seed": 8}),
                                   (2, 3, fp, {"sample_seed": 9})])
    assert results == [{"sample_seed": 7}] * 3


def test_long_values_that_differ_are_named_not_shown():
    port = _free_port()
    results = _meet(port, [(0, 2, {"prompts": [[1] * 50]}, {}), (1, 2, {"prompts": [[2] * 50]}, {})])
    assert results[0] == results[1]
    assert results[0].startswith("process 1 runs a different command from process 0 (different prompts);")


def test_a_different_number_of_processes_is_refused():
    results = _meet(_free_port(), [(0, 2, {}, {}), (1, 3, {}, {})])
    assert results == ["process 1 has --num-processes 3 but process 0 has 2; run the same command on every process "
                       "(only --process-id changes)"] * 2


def test_connections_that_are_not_moejax_processes_are_ignored():
    port = _free_port()
    results = [None]
    host = threading.Thread(target=lambda: results.__setitem__(0, _meet(port, [(0, 2, {}, {"x": 1})])[0]))
    host.start()
    strangers = []
    for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"[1, 2]\n", b""):  # HTTP, JSON that is no hello, silence
        strangers.append(_connect(port))
        strangers[-1].sendall(garbage)
    with _connect(port) as peer:  # then a real process 1 joins
        peer.sendall((json.dumps({"protocol": _PROTOCOL, "process_id": 1, "num_processes": 2, "host": "h",
                                  "nonce": "n", "fingerprint": {}, "shared": {}}) + "\n").encode())
        reply = json.loads(peer.makefile().readline())
    host.join(30)
    assert reply == {"protocol": _PROTOCOL, "shared": {"x": 1}} and results[0] == {"x": 1}
    for s in strangers:  # none is told to go on (the silent one could be one process too many): closed unanswered
        assert s.recv(100) == b""
        s.close()


def test_a_process_that_joined_and_left_counts_as_missing():
    port = _free_port()
    results = [None]
    host = threading.Thread(target=lambda: results.__setitem__(0, _meet(port, [(0, 3, {}, {})], timeout_s=2)[0]))
    host.start()
    with _connect(port) as peer:  # process 1 joins, then leaves; process 2 never comes
        peer.sendall((json.dumps({"protocol": _PROTOCOL, "process_id": 1, "num_processes": 3, "host": "h",
                                  "nonce": "n", "fingerprint": {}, "shared": {}}) + "\n").encode())
    host.join(30)
    assert results[0].startswith("processes 1, 2 of 3 did not join within 2 s (joined: 0;")


def _connect(port: int) -> socket.socket:
    for _ in range(200):  # until process 0 listens
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            threading.Event().wait(0.05)
    pytest.fail(f"nothing listens on port {port}")
