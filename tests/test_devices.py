"""`moejax.cpu_devices(n)`: N simulated CPU devices from Python, and clear errors when it is too late."""

import os
import subprocess
import sys

import pytest

import moejax


def test_fresh_process_gets_the_count_it_asks_for():
    code = ("import moejax\n"
            "print(len(moejax.cpu_devices(4)))\n"
            "try:\n"
            "    moejax.cpu_devices(2)\n"
            "except RuntimeError as err:\n"
            "    print(err)\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")  # an explicit call wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout.splitlines()
    assert out[0] == "4"
    assert out[1].startswith("moejax.cpu_devices(2): JAX already started with 4 CPU devices")
    assert "call moejax.cpu_devices(2) before any JAX computation" in out[1]


def test_in_a_started_process_the_same_count_is_fine_and_another_is_refused():
    assert len(moejax.cpu_devices(8)) == 8  # the count conftest set
    with pytest.raises(RuntimeError, match=r"JAX already started with 8 CPU devices"):
        moejax.cpu_devices(16)
    for bad in (0, 2000, 2.0, True):
        with pytest.raises(ValueError, match=r"n must be an integer in \[1, 1024\]"):
            moejax.cpu_devices(bad)


def test_a_layout_too_big_for_the_devices_names_cpu_devices():
    with pytest.raises(ValueError, match=r"layout DP16 needs 16 devices .*call moejax.cpu_devices\(16\) before JAX"):
        moejax.make_mesh("DP16")
