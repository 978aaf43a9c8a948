"""`moejax` command line: generate | plan."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_MODEL = "tiny-moe"
DEFAULT_LAYOUT = "TP2EP2PP2"


def _simulate_cpu_devices(n: int) -> None:
    """Give XLA:CPU n devices; must run before JAX initialises a backend. No effect on GPU platforms."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from err


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate tokens (greedy by default) on a layout",
                       description="Generate from a HF checkpoint dir or a built-in config (random weights).")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF checkpoint directory, or a config name in configs/models (random weights); "
                        f"default {DEFAULT_MODEL}")
    p.add_argument("--layout", default=DEFAULT_LAYOUT, help=f"e.g. DP2TP2EP2PP1 (default {DEFAULT_LAYOUT})")
    p.add_argument("--prompt-ids", type=_prompt_ids, action="append",
                   help="comma-separated token ids; repeat for several prompts (default: two built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="random-weight seed for config-name models")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices when running on CPU (default 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--sample-seed", type=int, default=None, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--stop-token-ids", type=_prompt_ids, default=[], help="comma-separated stop token ids")
    p.add_argument("--chunk-size", type=int, default=64, help="prefill chunk size (tokens per request per step)")
    p.add_argument("--page-size", type=int, default=16, help="KV cache page size")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")


def _run_generate(args) -> int:
    from pathlib import Path

    import jax

    import moejax

    if Path(args.model).is_dir():
        model = moejax.load(args.model, layout=args.layout, dtype=args.dtype)
    else:
        cfg = moejax.load_model_config(args.model)
        model = moejax.Model.random(cfg, seed=args.seed, layout=args.layout, dtype=args.dtype)
    prompts = args.prompt_ids or [[1, 5, 9, 13, 17], [3, 4]]
    engine, ids = _start_engine(model, prompts, args)  # compiled before the requests arrive
    while engine.has_unfinished():
        for out in engine.step():
            if not args.json and out.new_token_ids:
                print(f"  [{out.request_id}] {out.new_token_ids[0]}" + (f" ({out.finish_reason})" * out.finished),
                      flush=True)
    reqs = [engine.requests[i] for i in ids]
    new = [r.output_ids for r in reqs]
    stats = argparse.Namespace(ttft_s=sum(r.ttft_s for r in reqs) / len(reqs),
                               tpot_s=sum(r.tpot_s or 0.0 for r in reqs) / len(reqs))
    result = {
        "model": model.cfg.name, "layout": str(model.layout), "devices": model.layout.size,
        "platform": jax.devices()[0].platform, "tokens": new[0] if len(new) == 1 else new,
        "ttft_s": stats.ttft_s, "tpot_s": stats.tpot_s,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']} on {result['devices']} {result['platform']} devices, layout {result['layout']}")
        for prompt, out in zip(prompts, new, strict=True):
            print(f"  prompt {prompt} -> {out}")
        print(f"  time to first token {stats.ttft_s * 1e3:.1f} ms (after warm-up), "
              f"time per output token {stats.tpot_s * 1e3:.2f} ms")
    return 0


def _start_engine(model, prompts, args):
    """A warm engine sized for these prompts, every request added; returns (engine, request ids)."""
    import moejax
    from moejax.kv_cache import pages_for

    data = model.layout.data
    longest = max(map(len, prompts)) + args.max_new_tokens
    slots = -(-len(prompts) // data)
    config = moejax.ServeConfig(max_running=slots * data, page_size=args.page_size, chunk_size=args.chunk_size,
                                num_pages=slots * pages_for(longest, args.page_size), max_model_len=longest)
    engine = moejax.Engine(model, config)
    engine.warmup()
    ids = []
    for i, prompt in enumerate(prompts):
        seed = None if args.sample_seed is None else args.sample_seed + i
        params = moejax.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=seed,
                                       stop_token_ids=tuple(args.stop_token_ids))
        ids.append(engine.add_request(prompt, params))
    return engine, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moejax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from moejax.planner import cli as plan_cli

    plan_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":
        _simulate_cpu_devices(args.devices)
        return _run_generate(args)
    return plan_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
