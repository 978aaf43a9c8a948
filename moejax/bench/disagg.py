"""Disaggregated prefill and decode on a device split: tokens against the aggregated engine, KV bytes against the
planner.

    python -m moejax.bench.disagg --model tiny-moe --pairs TP4:DP2EP2,DP2EP2:TP4,TP2:TP2EP1PP2,DP2:DP2EP2
    moejax bench disagg --pairs TP2:DP2 --devices 4 --num-requests 8

For each pair PREFILL:DECODE the model (random weights, `moejax.Model.random`) is placed twice: the prefill layout
on the first devices, the decode layout on the next ones. A fixed workload (seeded prompts of --input-len tokens,
--output-len new tokens each, greedy) runs through `Engine(decode_model, config, prefill_model=prefill_model)` and,
once, through an aggregated reference (DP1 on the first device, the same config). A row: whether every request's
tokens equal the reference's, the requests whose KV pages moved (a request with one new token finishes on the
prefill side and moves none), the bytes moved per moved request (`EngineStats.kv_transfer_bytes` / those
requests: a request moved again after a decode-side preemption counts its bytes twice), the planner's bytes for
the same requests (`moejax.planner.disagg.kv_transfer_bytes` at each one's prompt length, averaged), their ratio,
and the wall time of the disaggregated run after warm-up. Exits 1 if any pair's tokens differ.

On simulated CPU devices the wall time checks nothing about speed: the devices share the host's cores.
"""

from __future__ import annotations

import sys
import time

from moejax.args import Parser, UsageError, int_in, read_model_config, run_main

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}  # the planner's KV format of a float pool


def parse_pairs(text: str, cfg) -> list[tuple]:
    """--pairs: comma-separated PREFILL:DECODE layouts, each validated against the model; UsageError otherwise."""
    from moejax.mesh import Layout

    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        sides = part.split(":")
        if len(sides) != 2:
            raise UsageError(f"--pairs: {part!r} is not PREFILL:DECODE (e.g. TP4:DP2EP2)")
        try:
            pairs.append(tuple(Layout.parse(s).validate(cfg) for s in sides))
        except ValueError as err:
            raise UsageError(f"--pairs: {err}") from err
    if not pairs:
        raise UsageError(f"--pairs: no pair given in {text!r}")
    return pairs


def workload(vocab: int, n: int, lengths: tuple[int, int], new_tokens: int, seed: int) -> tuple[list, list]:
    """(prompts, greedy SamplingParams): `n` seeded prompts of lengths[0]..lengths[1] tokens."""
    import numpy as np

    from moejax import SamplingParams

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, int(rng.integers(lengths[0], lengths[1] + 1))).tolist() for _ in range(n)]
    return prompts, [SamplingParams(max_new_tokens=new_tokens) for _ in prompts]


def serve_config(model, args, max_len: int):
    """The engine config of a (decode) model: max_running rounded up to its data groups x microbatch groups, pools
    for every running request at the longest length."""
    import moejax
    from moejax.kv_cache import pages_for

    unit = model.batch_shards * model.layout.stage
    rows = -(-args.max_running // unit) * unit
    return moejax.ServeConfig(max_running=rows, page_size=args.page_size, chunk_size=args.chunk_size,
                              max_prefill_seqs=2, max_model_len=max_len,
                              num_pages=rows // model.batch_shards * pages_for(max_len, args.page_size))


def run_pair(cfg, prefill_layout, decode_layout, prompts, params, args, devices) -> dict:
    """One pair's row: the disaggregated run's tokens, moves and bytes (the reference is compared by the caller)."""
    import moejax
    from moejax.planner.disagg import kv_transfer_bytes
    from moejax.planner.workload import Workload

    n, m = prefill_layout.size, decode_layout.size
    p = moejax.Model.random(cfg, seed=args.weights_seed, layout=prefill_layout, dtype=args.dtype, devices=devices[:n])
    d = moejax.Model.random(cfg, seed=args.weights_seed, layout=decode_layout, dtype=args.dtype,
                            devices=devices[n:n + m])
    max_len = max(map(len, prompts)) + args.output_len
    engine = moejax.Engine(d, serve_config(d, args, max_len), prefill_model=p)
    engine.warmup()
    t = time.perf_counter()
    ids = [engine.add_request(prompt, sp) for prompt, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    wall_s = time.perf_counter() - t
    reqs = [engine.requests[i] for i in ids]
    moved = [r for r in reqs if r.kv_bytes_moved]
    kv_format = PRECISION[d.dtype_name] if d.dtype_name in PRECISION else d.dtype_name
    planner = [kv_transfer_bytes(cfg, Workload(isl=r.prompt_len, osl=args.output_len, kv_precision=kv_format),
                                 args.page_size) for r in moved]
    measured = engine.stats.kv_transfer_bytes / len(moved) if moved else None
    planned = sum(planner) / len(planner) if planner else None
    return {"prefill_layout": str(prefill_layout), "decode_layout": str(decode_layout), "split": f"{n}+{m}",
            "tokens": [r.output_ids for r in reqs], "requests_moved": len(moved),
            "kv_transfers": engine.stats.kv_transfers, "preemptions": engine.stats.preemptions,
            "bytes_per_request": measured, "planner_bytes_per_request": planned,
            "ratio": measured / planned if measured and planned else None, "wall_s": wall_s}


def reference_tokens(cfg, prompts, params, args, device) -> list[list[int]]:
    """The aggregated engine's tokens: DP1 on one device, the same config."""
    import moejax

    model = moejax.Model.random(cfg, seed=args.weights_seed, layout="DP1", dtype=args.dtype, devices=[device])
    max_len = max(map(len, prompts)) + args.output_len
    return moejax.Engine(model, serve_config(model, args, max_len)).generate(prompts, params)


def format_table(rows: list[dict]) -> str:
    head = (f"{'prefill':<10} {'decode':<12} {'split':>5} {'tokens equal':>12} {'moved':>5} {'B/request':>10} "
            f"{'planner B/req':>13} {'ratio':>6} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        num = (lambda v: "-" if v is None else f"{v:.0f}")  # noqa: E731
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['prefill_layout']:<10} {r['decode_layout']:<12} {r['split']:>5} "
                     f"{'yes' if r['tokens_equal'] else 'NO':>12} {r['requests_moved']:>5} "
                     f"{num(r['bytes_per_request']):>10} {num(r['planner_bytes_per_request']):>13} {ratio:>6} "
                     f"{r['wall_s']:>7.2f}")
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m moejax.bench.disagg") -> int:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-moe", help="a config name in configs/models or a YAML (random weights)")
    p.add_argument("--pairs", default="TP4:DP2EP2,DP2EP2:TP4,TP2:TP2EP1PP2,DP2:DP2EP2",
                   help="comma-separated PREFILL:DECODE layouts (prefill on the first devices, decode on the next)")
    p.add_argument("--devices", type=int_in(1, 1024), default=8, help="simulated CPU devices (default 8)")
    p.add_argument("--dtype", default="float32", choices=sorted(PRECISION))
    p.add_argument("--num-requests", type=int_in(1), default=16)
    p.add_argument("--input-len", default="8:64", help="prompt tokens LO:HI, uniform (default 8:64)")
    p.add_argument("--output-len", type=int_in(1), default=16, help="new tokens per request (default 16)")
    p.add_argument("--max-running", type=int_in(1), default=8, help="ServeConfig.max_running (rounded up to the "
                                                                     "decode layout's groups)")
    p.add_argument("--chunk-size", type=int_in(1), default=32)
    p.add_argument("--page-size", type=int_in(1), default=16)
    p.add_argument("--seed", type=int_in(0), default=0, help="workload seed")
    p.add_argument("--weights-seed", type=int_in(0), default=0)
    args = p.parse_args(argv)
    cfg = read_model_config(args.model)
    pairs = parse_pairs(args.pairs, cfg)
    try:
        lo, hi = (int(x) for x in (args.input_len.split(":") * 2)[:2])
    except ValueError:
        raise UsageError(f"--input-len: expected N or LO:HI, got {args.input_len!r}") from None
    if not 1 <= lo <= hi or hi + args.output_len > cfg.max_position_embeddings:
        raise UsageError(f"--input-len {args.input_len}: need 1 <= LO <= HI and HI + --output-len <= the model's "
                         f"context ({cfg.max_position_embeddings})")
    for a, b in pairs:
        if a.size + b.size > args.devices:
            raise UsageError(f"--pairs: {a}:{b} needs {a.size + b.size} devices, --devices is {args.devices}")

    from moejax.devices import cpu_devices

    devices = cpu_devices(args.devices)
    prompts, params = workload(cfg.vocab_size, args.num_requests, (lo, hi), args.output_len, args.seed)
    expected = reference_tokens(cfg, prompts, params, args, devices[0])
    rows = []
    for a, b in pairs:
        row = run_pair(cfg, a, b, prompts, params, args, devices)
        row["tokens_equal"] = row.pop("tokens") == expected
        rows.append(row)
    print(f"{cfg.name}: {args.num_requests} requests, prompts {lo}-{hi} tokens, {args.output_len} new tokens, greedy, "
          f"page {args.page_size}, chunk {args.chunk_size}, {args.dtype}, on {args.devices} simulated CPU devices; "
          f"reference: DP1 aggregated")
    print(format_table(rows))
    return 0 if all(r["tokens_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
