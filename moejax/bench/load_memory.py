"""Host memory while loading: peak RSS above the process's baseline, against the largest per-device shard.

    python -m moejax.bench.load_memory [--model bench-moe-100m] [--layouts DP1,TP2EP2PP2,DP2EP4] [--dir DIR]

Builds a random Hugging Face checkpoint of the model (transformers, the `test` extra) and its moejax
conversion, then loads each kind under each layout in a fresh process on 8 simulated CPU devices and
reads the kernel's counters around `moejax.load` (the high-water mark VmHWM is reset just before it):

- imports: what importing the loader's libraries (orbax, tensorstore) adds to RSS; done before the
  baseline, since it is code and module state, the same for any checkpoint, not a load buffer;
- baseline: RSS after JAX has started and the loader is imported, just before the load;
- peak: the highest RSS during the load;
- placed: the bytes of the distinct host buffers holding the placed weights. On CPU the devices'
  memory is host memory, so the placed weights are part of the peak, and `device_put` aliases an
  aligned host block instead of copying it: the devices that hold the same block (a replicated
  weight) share one buffer, counted once here (`shards` counts it once per device). What loading costs
  beyond the weights is peak - baseline - placed (on a GPU host the weights leave for the devices,
  so this is about what the host itself needs above its baseline).

All against the largest single per-device shard of any parameter (`largest shard`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEVICES = 8


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, layout: str) -> dict:
    """Load `path` under `layout` in this process; memory figures in bytes (see the module docstring)."""
    import gc

    import jax

    import moejax

    jax.devices()
    gc.collect()
    before_imports = _status("VmRSS")
    import moejax.checkpoint.store  # noqa: F401

    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    model = moejax.load(path, layout=layout)
    jax.block_until_ready(model.params)
    peak = _status("VmHWM")
    shards = [s.data for a in jax.tree.leaves(model.params) for s in a.addressable_shards]
    buffers = {(x.unsafe_buffer_pointer(), x.nbytes) for x in shards}
    return {"imports": baseline - before_imports, "baseline": baseline, "peak": peak,
            "largest_shard": max(x.nbytes for x in shards), "placed": sum(n for _, n in buffers),
            "shards": sum(x.nbytes for x in shards)}


def _measure_in_fresh_process(path: Path, layout: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    out = subprocess.run([sys.executable, "-m", "moejax.bench.load_memory", "--measure", str(path), layout],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench-moe-100m", help="mixtral-family config name or path")
    parser.add_argument("--layouts", default="DP1,TP2EP2PP2,DP2EP4")
    parser.add_argument("--dir", default="out/load_memory", help="where the two checkpoints are written")
    parser.add_argument("--measure", nargs=2, metavar=("CKPT", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0

    from moejax.bench.decode import build_checkpoint
    from moejax.checkpoint import store
    from moejax.checkpoint.hf import HFSource
    from moejax.config import load_model_config

    cfg = load_model_config(args.model)
    root = Path(args.dir)
    paths = {"huggingface": root / "hf", "moejax": root / "moejax"}
    if not paths["huggingface"].exists():
        build_checkpoint(cfg, paths["huggingface"])
    if not paths["moejax"].exists():
        source = HFSource(paths["huggingface"])
        store.save(paths["moejax"], source, source.cfg)
    mib = 2**20
    print(f"model {cfg.name or args.model}, float32, {DEVICES} CPU devices, one process; MiB")
    print("| checkpoint | layout | largest shard | shards | placed | imports | peak - baseline | "
          "peak - baseline - placed | (peak - baseline - placed) / largest shard |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for layout in args.layouts.split(","):
        for kind, path in paths.items():
            r = _measure_in_fresh_process(path, layout)
            above = r["peak"] - r["baseline"]
            extra = above - r["placed"]
            print(f"| {kind} | {layout} | {r['largest_shard'] / mib:.1f} | {r['shards'] / mib:.1f} | "
                  f"{r['placed'] / mib:.1f} | {r['imports'] / mib:.1f} | {above / mib:.1f} | {extra / mib:.1f} | "
                  f"{extra / r['largest_shard']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
