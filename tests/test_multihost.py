"""Multi-host runs: 2 processes x 4 CPU devices on loopback == 1 process x 8 devices.

The run starts both processes itself (tests/multihost_worker.py), bounds them with a timeout and
kills them whatever happens. The unit tests below check the flags and the device layout without JAX.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import moejax
from moejax import distributed
from moejax.checkpoint import store
from moejax.checkpoint.hf import HFSource
from moejax.mesh import AXES
from tests import multihost_worker as worker

WORKER = Path(__file__).with_name("multihost_worker.py")
# Stage across the two processes (each holds one stage's layers), then data across them (each holds half the rows).
# Each layout is its own run of two processes; TP4PP2's runs in CI's slow step (the default suite runs the README's
# TP4PP2 command on two processes: tests/test_multihost_errors.py).
LAYOUTS = ("TP4PP2", "DP2TP2EP2")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ckpt(hf_checkpoints, tmp_path_factory):
    source = HFSource(hf_checkpoints["qwen2_moe"][0])
    path = tmp_path_factory.mktemp("multihost") / "ckpt"
    store.save(path, source, source.cfg)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(ckpt: Path, out: Path, logs: Path, layouts=LAYOUTS) -> list[tuple[int, str, str]]:
    """Start both processes, wait at most TIMEOUT_S, kill whatever is left; (returncode, stdout, stderr) each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    port = _free_port()
    procs, files = [], []
    try:
        for i in range(2):
            files.append((open(logs / f"out{i}.txt", "w"), open(logs / f"err{i}.txt", "w")))
            cmd = [sys.executable, str(WORKER), str(ckpt), str(out), ",".join(layouts),
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            procs.append(subprocess.Popen(cmd, stdout=files[i][0], stderr=files[i][1], env=env,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and anything it started
                p.wait()
        for f_out, f_err in files:
            f_out.close()
            f_err.close()
    return [(p.returncode, (logs / f"out{i}.txt").read_text(), (logs / f"err{i}.txt").read_text())
            for i, p in enumerate(procs)]


@pytest.mark.parametrize("layout", [pytest.param("TP4PP2", marks=pytest.mark.slow), "DP2TP2EP2"])
def test_two_processes_give_the_one_process_tokens_and_logits(ckpt, tmp_path, layout):
    out = tmp_path / "result.npz"
    runs = _run_two_processes(ckpt, out, tmp_path, (layout,))
    for i, (code, _, err) in enumerate(runs):
        assert code == 0, f"process {i} exited with {code}:\n{err[-3000:]}"
    # Only process 0 prints (and its stdout holds nothing else: native gloo notices go to stderr).
    assert runs[0][1].splitlines() == ["stdout of process 0"]
    assert runs[1][1] == ""
    result = np.load(out)
    model = moejax.load(ckpt, layout=layout)  # 1 process x 8 devices
    np.testing.assert_allclose(result[f"{layout}/logits"], model.forward(worker.IDS), atol=1e-5, rtol=0)
    # Greedy decoding through Model.generate in both runs (rows split over processes on DP2TP2EP2).
    assert result[f"{layout}/tokens"].tolist() == model.generate(worker.PROMPTS, worker.NEW_TOKENS)
    assert result[f"{layout}/engine"].tolist() == result[f"{layout}/tokens"].tolist()  # the serving engine
    # Each process read from the checkpoint only what its own 4 devices hold.
    reads = {}
    for _, _, err in runs:
        for line in err.splitlines():
            if line.startswith('{"process"'):
                row = json.loads(line)
                reads[row["process"], row["layout"]] = row["layers_read"]
                assert row["local_devices"] == worker.DEVICES_PER_PROCESS
    if layout == "TP4PP2":  # stage 0 (layers 0, 1) on process 0, stage 1 (layer 2 and a padding layer) on process 1
        assert reads[0, "TP4PP2"] == [0, 1] and reads[1, "TP4PP2"] == [2]
    else:  # DP2TP2EP2: every process holds a whole model copy
        assert reads[0, "DP2TP2EP2"] == reads[1, "DP2TP2EP2"] == [0, 1, 2]


# ---- flags and device layout (no JAX runtime) ------------------------------------------------------


def _args(**flags):
    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return parser.parse_args(argv)


def test_single_process_without_flags_or_environment():
    assert distributed.cluster_from(_args(), environ={}) is None


def test_flags_and_environment_name_the_cluster():
    cluster = distributed.cluster_from(_args(coordinator="10.0.0.1:1234", num_processes=4, process_id=3), environ={})
    assert cluster == distributed.Cluster("10.0.0.1:1234", 4, 3, ("data", "stage"))
    env = {"JAX_COORDINATOR_ADDRESS": "[::1]:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.cluster_from(_args(process_id=1), environ=env) == distributed.Cluster("[::1]:99", 2, 1)


@pytest.mark.parametrize("flags, env, message", [
    (dict(coordinator="h:1"), {}, r"missing --num-processes \(or \$JAX_NUM_PROCESSES\), --process-id"),
    (dict(coordinator="h", num_processes=2, process_id=0), {}, r"--coordinator must be HOST:PORT"),
    (dict(coordinator="h:70000", num_processes=2, process_id=0), {}, r"port in \[1, 65535\], got 'h:70000'"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), {}, r"--process-id must be in \[0, 1\]"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), {}, r"--num-processes must be in \[1, "),
    (dict(coordinator="h:1", process_id=0), {"JAX_NUM_PROCESSES": "two"}, r"\$JAX_NUM_PROCESSES must be an integer"),
])
def test_incomplete_or_inconsistent_setup_is_a_clear_error(flags, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.cluster_from(_args(**flags), environ=env)


def test_across_hosts_flag_is_checked():
    assert _args(across_hosts="expert,data").across_hosts == ("expert", "data")
    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    with pytest.raises(ValueError, match="distinct mesh axes"):
        parser.parse_args(["--across-hosts", "data,data"])
    with pytest.raises(ValueError, match="distinct mesh axes"):
        parser.parse_args(["--across-hosts", "pipeline"])


def _hosts_of(grid: np.ndarray, axis: str) -> int:
    """How many processes one group along `axis` spans (1: inside a host) — the worst group."""
    order = ("data", "stage", "expert", "tensor")
    moved = np.moveaxis(grid, order.index(axis), -1).reshape(-1, grid.shape[order.index(axis)])
    return max(len({d.process_index for d in group}) for group in moved)


@pytest.mark.parametrize("across, crossing", [(("data", "stage"), "data"), (("stage",), "stage"),
                                              (("expert",), "expert")])
def test_device_grid_puts_the_chosen_axes_across_hosts(across, crossing, monkeypatch):
    fake = [SimpleNamespace(process_index=p, id=p * 100 + i) for p in range(2) for i in range(8)]
    sizes = dict(zip(AXES, (2, 2, 2, 2), strict=True))  # data, tensor, expert, stage
    order = ("data", "stage", "expert", "tensor")
    monkeypatch.setattr(distributed, "_across_hosts", across)
    grid = distributed.device_grid(sizes, order, fake[::-1])  # any input order: taken process by process
    assert grid.shape == (2, 2, 2, 2) and {d.id for d in grid.flat} == {d.id for d in fake}
    for axis in order:
        assert _hosts_of(grid, axis) == (2 if axis == crossing else 1), axis


def test_coordinator_timeout_flag():
    assert _args().coordinator_timeout == distributed.DEFAULT_TIMEOUT_S <= 60
    cluster = distributed.cluster_from(_args(coordinator="h:1", num_processes=2, process_id=0, coordinator_timeout=2.5),
                                       environ={})
    assert cluster.timeout_s == 2.5
    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    for bad in ("0", "-1", "nan", "inf", "soon", "1e9"):
        with pytest.raises(ValueError, match=r"--coordinator-timeout: must be a number of seconds in \(0, 86400\]"):
            parser.parse_args(["--coordinator-timeout", bad])


def test_simulated_devices_are_the_runs_total_split_between_processes():
    cluster = distributed.Cluster("h:1", 2, 1)
    assert distributed.local_device_count(None, 8, 8) == 8
    assert distributed.local_device_count(cluster, 8, 8) == 4
    assert distributed.local_device_count(cluster, 16, 4) == 8
    with pytest.raises(ValueError, match=r"the layout's 8 devices do not split evenly between 3 processes"):
        distributed.local_device_count(distributed.Cluster("h:1", 3, 0), 9, 8)
    assert distributed.local_device_count(cluster, 7, 8) == 4  # rounded up (unused on GPUs or with XLA_FLAGS)


def test_a_mesh_takes_the_same_number_of_devices_from_every_process():
    fake = [SimpleNamespace(process_index=p, id=p * 100 + i) for p in range(2) for i in range(4)]
    taken = distributed.take_devices(fake[::-1], 4)  # not the first 4 (process 0's): 2 of each
    assert [(d.process_index, d.id) for d in taken] == [(0, 0), (0, 1), (1, 100), (1, 101)]
    with pytest.raises(ValueError, match="3 does not split evenly"):
        distributed.take_devices(fake, 3)
    with pytest.raises(ValueError, match="a process has only 4 devices, 5 needed"):
        distributed.take_devices(fake[:4] + fake[4:] + [SimpleNamespace(process_index=0, id=9)] * 2, 10)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator-timeout", "0"], r"argument --coordinator-timeout: must be a number of seconds in \(0, 86400\]"),
    (["--num-processes", "3"], r"the layout's 8 devices do not split evenly between 3 processes"),
    (["--coordinator", "10.0.0.1"], r"--coordinator must be HOST:PORT"),
])
def test_generate_refuses_a_bad_multi_host_setup_before_jax_starts(flags, message, capsys):
    """One line, exit 2, before any rendezvous or device work (nothing listens, nothing connects)."""
    from moejax import cli

    base = {"--coordinator": "127.0.0.1:1", "--num-processes": "2", "--process-id": "0"}
    base.update(zip(flags[::2], flags[1::2], strict=True))
    assert cli.main(["generate", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("moejax: error: ")
    assert re.search(message, err), err
