"""Multi-process `moejax generate` runs that cannot start, and the README's command on one host.

Every case starts real processes (`python -m moejax ...`) on loopback. A run that cannot start must end
every process it started with one line `moejax: error: ...` (exit 2), no traceback and no C++ `Check
failure`, within `--coordinator-timeout`: nothing here waits for JAX's own start-up timeout. The time each
process took is printed (`pytest -s`), never asserted: the subprocess timeout only guards against a hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moejax.args import read_model_config
from moejax.inference import Model
from moejax.weights import RandomSource

HANG_S = 240  # far above any case's --coordinator-timeout: only a hang reaches it
README_LAYOUT = "TP4PP2"
NEW_TOKENS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """A reader's environment: CPU only, no XLA_FLAGS (so --devices applies), no JAX_* of this test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _start(commands: list[list[str]], tmp_path) -> list[tuple[int, str, str, float]]:
    """Run `moejax generate` once per argument list, all at once; (exit status, stdout, stderr, seconds) each."""
    procs, files, began = [], [], time.monotonic()
    try:
        for i, args in enumerate(commands):
            out, err = open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, "-m", "moejax", "generate", *args], stdout=out,
                                          stderr=err, env=_env(), start_new_session=True))
        ended = [None] * len(procs)
        while None in ended and time.monotonic() - began < HANG_S:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.monotonic() - began
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and anything it started
                p.wait()
    results = []
    for p, (out, err), seconds in zip(procs, files, ended, strict=True):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read(), seconds))
        out.close(), err.close()
    return results


def _cluster(port: int, n: int, i: int, timeout_s: float, *extra: str) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
            "--coordinator-timeout", str(timeout_s), "--max-new-tokens", "2", *extra]


def _cases(silent_port: int) -> dict[str, tuple[list[list[str]], list[str]]]:
    """case -> (the arguments of each process, what its one line must hold). Fresh ports on each call."""
    port, wrong, port1, port2, port3, port4 = (_free_port() for _ in range(6))
    missing = f"processes 1, 3 of 4 did not join within 10 s (joined: 0, 2; coordinator 127.0.0.1:{port1})"
    unknown = ["--coordinator", "no-such-host.invalid:1234", "--num-processes", "2", "--coordinator-timeout", "30"]
    resolve = "--coordinator no-such-host.invalid:1234: cannot resolve host 'no-such-host.invalid'"
    differ = ("process 1 runs a different command from process 0 (--layout TP4PP2 vs DP2TP2EP2; --temperature 0.0 vs "
              "0.5); run the same command on every process (only --process-id changes)")
    return {
        # 4 processes expected, 0 and 2 started (the default layout's 8 devices: 2 per process).
        "missing peer": ([_cluster(port1, 4, 0, 10), _cluster(port1, 4, 2, 10)], [missing, missing]),
        "coordinator nobody listens on": (
            [_cluster(port, 2, 0, 3), _cluster(wrong, 2, 1, 3)],
            ["process 1 of 2 did not join within 3 s",
             f"process 1 could not reach the coordinator (process 0) at 127.0.0.1:{wrong} within 3 s (Connection "
             f"refused)"]),
        "unknown coordinator host": ([[*unknown, "--process-id", "0"], [*unknown, "--process-id", "1"]],
                                     [resolve, resolve]),
        "port held by another program": ([_cluster(silent_port, 2, 0, 30)],
                                         [f"port {silent_port} is in use on this host by another program"]),
        "id 1 twice": ([_cluster(port2, 4, i, 60) for i in (0, 1, 1)], ["two processes claim --process-id 1"] * 3),
        "id 0 twice": ([_cluster(port3, 4, i, 60) for i in (0, 0)], ["two processes claim --process-id 0"] * 2),
        "different commands": ([_cluster(port4, 2, 0, 60, "--layout", "TP4PP2"),
                                _cluster(port4, 2, 1, 60, "--layout", "DP2TP2EP2", "--temperature", "0.5")],
                               [differ, differ]),
    }


def _run_cases(names, tmp_path) -> dict[str, tuple[list, list[str]]]:
    """Start the processes of every case in `names` at once; case -> (results, expected parts)."""
    with socket.socket() as silent:  # a port held by a program that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cases = {name: case for name, case in _cases(silent.getsockname()[1]).items() if name in names}
        commands = [args for args, _ in cases.values() for args in args]
        results = iter(_start(commands, tmp_path))
        return {name: ([next(results) for _ in args], parts) for name, (args, parts) in cases.items()}


def _assert_one_line(case: str, results, expected: list[str]) -> None:
    """Each process ended (exit 2) with exactly one stderr line, `moejax: error: ` + a message holding its part."""
    for i, ((code, out, err, seconds), part) in enumerate(zip(results, expected, strict=True)):
        print(f"{case}: started process {i} ended in {seconds:.1f} s: {err.strip()}")
        assert code == 2, f"{case}: process {i} exited with {code}:\n{err[-3000:]}"
        assert out == ""
        assert "Traceback" not in err and "Check failure" not in err, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("moejax: error: "), err
        assert part in lines[0], (part, lines[0])


CASES = list(_cases(0))


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory):
    """Every case's processes, all started at once (the run lasts as long as its slowest case)."""
    return _run_cases(CASES, tmp_path_factory.mktemp("cases"))


@pytest.mark.parametrize("case", CASES)
def test_a_run_that_cannot_start_ends_every_process_with_one_line(case, failed_runs):
    results, expected = failed_runs[case]
    _assert_one_line(case, results, expected)


def test_a_jax_start_up_that_hangs_ends_with_one_line_not_a_cpp_abort():
    """After the rendezvous, JAX's own start-up runs under a watchdog: here process 1 looks for a JAX service
    that never comes (the rendezvous skipped), and ends at the timeout, long before JAX's own abort."""
    port = _free_port()
    code = f"from moejax import distributed; distributed.initialize(distributed.Cluster('127.0.0.1:{port}', 2, 1, " \
           f"timeout_s=2))"
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=HANG_S)
    print(f"JAX start-up watchdog: ended in {time.monotonic() - began:.1f} s: {out.stderr.strip()}")
    assert out.returncode == 2 and "Check failure" not in out.stderr
    assert out.stderr.splitlines() == ["moejax: error: process 1: JAX's distributed runtime did not start within 2 s "
                                       f"although every process joined (coordinator 127.0.0.1:{port}); a process "
                                       f"may have ended, or a firewall lets the rendezvous through but not JAX's "
                                       f"service"]


def test_the_readme_command_runs_on_one_host_with_its_share_of_the_devices(tmp_path):
    """Two processes of the README's command (each makes 4 of the 8 simulated devices) give the one-process
    tokens; only process 0 prints; gloo's connection notices show only with --debug (process 1 here)."""
    port = _free_port()
    common = ["--layout", README_LAYOUT, "--max-new-tokens", str(NEW_TOKENS), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2"]
    results = _start([[*common, "--process-id", "0", "--json"], [*common, "--process-id", "1", "--debug"]],
                     tmp_path)
    for i, (code, _, err, seconds) in enumerate(results):
        print(f"README command: process {i} ended in {seconds:.1f} s")
        assert code == 0, f"process {i} exited with {code}:\n{err[-3000:]}"
    (_, out0, err0, _), (_, out1, err1, _) = results
    result = json.loads(out0)
    assert result["devices"] == 8 and result["layout"] == README_LAYOUT and out1 == ""
    assert "[Gloo]" not in err0 and "[Gloo]" in err1
    cfg = read_model_config("tiny-moe")
    model = Model(cfg, RandomSource(cfg, 0), layout=README_LAYOUT)  # one process, 8 devices, the same weights
    assert result["tokens"] == model.generate(result["prompt_ids"], max_new_tokens=NEW_TOKENS)


if __name__ == "__main__":  # each case alone, one after the other: the time each takes to end
    import tempfile
    from pathlib import Path

    for name in CASES:
        with tempfile.TemporaryDirectory() as folder:
            (results, expected), = _run_cases([name], Path(folder)).values()
            _assert_one_line(name, results, expected)
