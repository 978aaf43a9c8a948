"""Pipelined vs sequential schedule of pipeline-parallel layouts, on simulated CPU devices.

    python -m moejax.bench.pipeline --layouts PP2,PP4 --requests 16 --isl 32 --osl 32 --rounds 3

For each layout, one placed model and two engines that differ only in `ServeConfig.microbatches`:
`1` (the sequential schedule: each call takes its batch through every stage in turn, the other
stages idle) and `stage` (the pipelined one: each call is one tick, every stage busy with its own
microbatch group). Each round runs the same workload (all requests submitted at once, greedy,
fixed lengths) on both, alternating which goes first; it prints tokens/s, engine steps/s and
mean TTFT per schedule and the pipelined / sequential tokens/s ratio of each round (the ratio
within a round is the figure to trust on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def run_workload(engine, prompts, osl: int) -> dict:
    """All prompts at once to completion; returns tokens/s, steps/s, mean TTFT and the tokens made."""
    from moejax import SamplingParams

    params = SamplingParams(max_new_tokens=osl)
    steps0 = engine.stats.steps
    t = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t
    reqs = [engine.requests[i] for i in ids]
    return {"tokens_per_s": sum(r.num_output for r in reqs) / wall, "steps_per_s": (engine.stats.steps - steps0) / wall,
            "ttft_s": statistics.mean(r.ttft_s for r in reqs), "tokens": [r.output_ids for r in reqs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-moe-100m", help="model config (name or YAML); random weights")
    p.add_argument("--layouts", default="PP2,PP4")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--isl", type=int, default=32, help="prompt tokens")
    p.add_argument("--osl", type=int, default=32, help="new tokens")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # read when JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    import numpy as np

    import moejax

    cfg = moejax.load_model_config(args.model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.isl).tolist() for _ in range(args.requests)]
    for name in layouts:
        model = moejax.Model.random(cfg, layout=name)
        S = model.layout.stage
        engines = {}
        for M in (1, S):
            config = moejax.ServeConfig(max_running=args.requests, microbatches=M, chunk_size=args.isl,
                                        max_prefill_seqs=args.requests // (M * model.batch_shards),
                                        max_model_len=args.isl + args.osl, page_size=16,
                                        num_pages=args.requests * (args.isl + args.osl) // 16 + 8)
            engines[M] = moejax.Engine(model, config)
            engines[M].warmup()
            run_workload(engines[M], prompts[: S * model.batch_shards], 2)  # compile the rest too
        ratios, rows = [], {1: [], S: []}
        for r in range(args.rounds):
            order = (1, S) if r % 2 == 0 else (S, 1)
            got = {M: run_workload(engines[M], prompts, args.osl) for M in order}
            if got[1]["tokens"] != got[S]["tokens"]:
                raise SystemExit(f"{name}: the two schedules made different tokens")
            for M in (1, S):
                rows[M].append(got[M])
            ratios.append(got[S]["tokens_per_s"] / got[1]["tokens_per_s"])
            print(f"{name} round {r}: sequential {got[1]['tokens_per_s']:.1f} tok/s, pipelined "
                  f"{got[S]['tokens_per_s']:.1f} tok/s, ratio {ratios[-1]:.2f}", flush=True)
        for M, label in ((1, "sequential (microbatches 1)"), (S, f"pipelined (microbatches {S})")):
            tps, sps, ttft = (statistics.median(x[key] for x in rows[M]) for key in ("tokens_per_s", "steps_per_s",
                                                                                    "ttft_s"))
            print(f"{name} {label}: {tps:.1f} tok/s, {sps:.1f} steps/s, TTFT {ttft * 1e3:.0f} ms")
        print(f"{name}: pipelined / sequential tokens/s, median of {args.rounds} rounds: "
              f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
