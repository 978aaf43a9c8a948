"""Compile benchmark: how long a model takes to place and to warm up on a layout, and how big its program is.

    python -m moejax.bench.compile --model qwen3-30b-a3b-tiny --layouts DP1,EP8,DP2TP2EP2
    python -m moejax.bench.compile --model deepseek-count-tiny --layouts DP1 --out compile.jsonl

For each layout, in a fresh engine (random weights, float32, CPU devices simulated as needed):
weight placement time, engine warm-up time (compiling every shape of the default `ServeConfig`:
the prefill chunk and each decode bucket), the compiled program size (HLO instructions of the
decode step, from `compiled.as_text()`) and the process's peak resident memory. A real model
needs all of these to be independent of its expert and layer counts; compare two configs that
differ only in those counts to see it. Prints a table and writes one JSON line per layout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time


def hlo_instructions(text: str) -> int:
    """Instructions in an HLO module's text (lines of the form `%name = type op(...)`)."""
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, flags=re.MULTILINE))


def measure(model_name: str, layout: str, serve_overrides: dict | None = None, ep_attention: str = "data") -> dict:
    """Place, warm up and size one (model, layout); returns the figures as a dict."""
    import jax

    import moejax

    cfg = moejax.load_model_config(model_name)
    t0 = time.perf_counter()
    model = moejax.Model.random(cfg, layout=layout, ep_attention=ep_attention)
    jax.block_until_ready(model.params)
    place_s = time.perf_counter() - t0
    engine = moejax.Engine(model, moejax.ServeConfig(**(serve_overrides or {})))
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0
    text = engine.compiled_step("decode", engine.decode_buckets[0]).as_text()
    return {"model": cfg.name, "layout": str(model.layout), "ep_attention": ep_attention,
            "experts": cfg.num_experts, "layers": cfg.num_layers,
            "place_s": round(place_s, 2), "warmup_s": round(warmup_s, 2),
            "shapes": 1 + len(engine.decode_buckets), "decode_hlo_instructions": hlo_instructions(text),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "platform": jax.devices()[0].platform}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m moejax.bench.compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b-tiny", help="model config name or path (random weights)")
    p.add_argument("--layouts", default="DP1", help="comma-separated layouts, e.g. DP1,EP8,DP2TP2EP2")
    p.add_argument("--ep-attention", default="data", choices=["data", "replicated"], help="the expert axis's mode")
    p.add_argument("--out", default=None, help="append one JSON line per layout to this file")
    args = p.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts:
        p.error("--layouts is empty")
    from moejax.mesh import Layout

    need = max(Layout.parse(x).size for x in layouts)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()
    print(f"{'layout':<12} {'place s':>8} {'warm-up s':>10} {'HLO instr':>10} {'peak RSS GiB':>13}")
    for layout in layouts:
        row = measure(args.model, layout, ep_attention=args.ep_attention)
        print(f"{row['layout']:<12} {row['place_s']:>8.2f} {row['warmup_s']:>10.2f} "
              f"{row['decode_hlo_instructions']:>10} {row['peak_rss_gib']:>13.2f}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
