"""`moejax` command line: generate | plan | convert | demo-checkpoint | sweep | bench serve|decode|gemm|native|
compile|gpu.

Every user mistake (a bad flag, an unknown model or hardware name, a malformed file, a prompt or sampling
value the model cannot take) prints one line `moejax: error: ...` to stderr and exits with status 2; `--debug`
adds the traceback. `generate` checks its prompts and sampling flags against the model config before JAX
starts, so a mistake costs no model build and no compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import sys

from moejax import distributed
from moejax.args import (
    ASYNC_SCHEDULING_HELP,
    DEFAULT_LAYOUT,
    Parser,
    UsageError,
    add_debug,
    add_dtype,
    check_context,
    check_devices,
    int_in,
    int_list,
    read_model_config,
    resolved_dtype,
    run_main,
)
from moejax.config import KV_CACHE_DTYPES, QUANTIZATIONS
from moejax.devices import MAX_SIMULATED_DEVICES, request_cpu_devices
from moejax.progress import Progress
from moejax.tokenizer import TOKENIZER_FILE, TextStream, decode, encode, load_tokenizer

DEFAULT_MODEL = "tiny-moe"
DEFAULT_PROMPTS = ((1, 5, 9, 13, 17), (3, 4))


# ---- generate ------------------------------------------------------------------------------------


def _add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text or tokens (greedy by default) on a layout",
                       description="Generate from a HF checkpoint dir or a built-in config (random weights). "
                                   "Progress goes to stderr, results to stdout.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF checkpoint directory, or a config name in configs/models (random weights); "
                        f"default {DEFAULT_MODEL}")
    p.add_argument("--layout", default=DEFAULT_LAYOUT, help=f"e.g. DP2TP2EP2PP1 (default {DEFAULT_LAYOUT})")
    p.add_argument("--prefill-layout", default=None,
                   help="disaggregated serving: prefill every prompt on a model of this layout on the first devices, "
                        "decode on --layout over the next ones, each request's KV pages moved between (--devices "
                        "must cover both)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append",
                         help="a text prompt, encoded with the checkpoint's tokenizer.json; repeat for several")
    prompts.add_argument("--prompt-ids", type=int_list(0), action="append",
                         help="comma-separated token ids; repeat for several prompts (default: two built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_dtype(p)
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="quantize the weights at load, weight-only (vLLM's flag): int8 / fp8 per output channel, "
                        "int4 in blocks of 128")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES],
                   help="KV cache format (vLLM's flag): auto = the serving dtype; fp8 (e4m3) / int8 = 1 byte per "
                        "value and a float32 scale per token and kv head")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV pages of a prompt prefix an earlier request computed (vLLM's flag; "
                        "ServeConfig.enable_prefix_caching): the same tokens, less prefill")
    p.add_argument("--async-scheduling", action="store_true", help=ASYNC_SCHEDULING_HELP)
    p.add_argument("--seed", type=int, default=0, help="random-weight seed for config-name models")
    p.add_argument("--devices", type=int_in(1, MAX_SIMULATED_DEVICES), default=8,
                   help=f"simulated CPU devices when running on CPU (default 8, at most {MAX_SIMULATED_DEVICES}); "
                        f"at least the layout's size")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="sampling seed (prompt i uses seed + i); default: a fresh seed per run, printed by --json "
                        "as sample_seed so the run can be repeated")
    p.add_argument("--stop-token-ids", type=int_list(0, allow_empty=True), default=[],
                   help="comma-separated stop token ids")
    p.add_argument("--chunk-size", type=int_in(1), default=64,
                   help="prefill chunk size (tokens per request per step; at most the model's context limit)")
    p.add_argument("--page-size", type=int_in(1), default=16,
                   help="KV cache page size (at most the model's context limit)")
    p.add_argument("--microbatches", type=int_in(1), default=None,
                   help="pipeline microbatch groups (ServeConfig.microbatches; default: one per stage, 1: the "
                        "sequential schedule)")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    distributed.add_flags(p)
    return p


_FLAG_OF_FIELD = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p", "seed": "--sample-seed", "stop": "--stop-token-ids",
                  "stop_token_ids": "--stop-token-ids"}


@dataclasses.dataclass
class _Run:
    """What `generate` checked on the host: the model config, layout, serving dtype, prompts and their sampling."""

    cfg: object
    layout: object
    prefill_layout: object  # --prefill-layout (disaggregated), or None
    dtype: str  # --dtype resolved ("auto": the checkpoint's own)
    prompts: list[list[int]]
    params: list  # SamplingParams per prompt
    tokenizer: object  # tokenizers.Tokenizer, or None
    seed: int  # --sample-seed, or the one drawn for this run
    seed_drawn: bool


def _check_generate(args) -> _Run:
    """Everything `generate` can check on the host before JAX starts.

    Raises UsageError naming the flag: unknown model, a layout that cannot run it, text without a tokenizer,
    a prompt token outside the vocabulary, a sampling value `SamplingParams.check` refuses, a request longer
    than the model's context, a chunk or page size beyond it.
    """
    from moejax.mesh import Layout

    cfg = read_model_config(args.model)
    cfg.check_runtime_support()
    layout = Layout.parse(args.layout).validate(cfg)
    prefill_layout = _check_prefill_layout(args, cfg)
    dtype = resolved_dtype(args.dtype, cfg)
    tokenizer = load_tokenizer(args.model) if os.path.isdir(args.model) else None
    if args.prompt:
        if tokenizer is None:
            what = "a built-in config (random weights)" if not os.path.isdir(args.model) else args.model
            raise UsageError(f"--prompt: {what} has no {TOKENIZER_FILE} to encode text with; pass --prompt-ids")
        prompts = [encode(tokenizer, text) for text in args.prompt]
        source = "--prompt"
    else:
        prompts = [list(p) for p in (args.prompt_ids or DEFAULT_PROMPTS)]
        source = "--prompt-ids" if args.prompt_ids else "built-in prompt"
    vocab, limit = cfg.vocab_size, cfg.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UsageError(f"--prompt: prompt {i} ({args.prompt[i]!r}) encodes to no tokens")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"{source}: token id {bad[0]} (prompt {i}) is out of vocabulary "
                             f"(vocab_size={vocab}); allowed: [0, {vocab - 1}]")
    drawn = args.sample_seed is None
    seed = secrets.randbelow(2**31) if drawn else args.sample_seed  # + one per prompt stays below 2**32
    params = _sampling(args, seed, len(prompts), vocab)
    longest = max(map(len, prompts)) + args.max_new_tokens
    if longest > limit:
        raise UsageError(f"--max-new-tokens: the longest prompt ({max(map(len, prompts))} tokens) + "
                         f"{args.max_new_tokens} new tokens = {longest} exceeds the model's context limit "
                         f"(max_position_embeddings={limit})")
    check_context(cfg, (("--chunk-size", args.chunk_size), ("--page-size", args.page_size)))
    return _Run(cfg, layout, prefill_layout, dtype, prompts, params, tokenizer, seed, drawn)


def _check_prefill_layout(args, cfg):
    """--prefill-layout parsed and validated, or None; refused with what the disaggregated engine does not run."""
    from moejax.mesh import Layout

    if args.prefill_layout is None:
        return None
    try:
        layout = Layout.parse(args.prefill_layout).validate(cfg)
    except ValueError as err:
        raise UsageError(f"--prefill-layout: {err}") from err
    if args.async_scheduling:
        raise UsageError("--prefill-layout: disaggregated serving does not run with --async-scheduling yet; drop one")
    if distributed.cluster_from(args) is not None:
        raise UsageError("--prefill-layout: disaggregated serving runs in one process; drop the multi-host flags")
    return layout


def _sampling(args, seed: int, count: int, vocab: int) -> list:
    """SamplingParams per prompt (prompt i draws with seed + i), checked against the model."""
    from moejax.engine.sampling import SamplingParams

    params = []
    for i in range(count):
        p = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=seed + i, stop_token_ids=tuple(args.stop_token_ids))
        try:
            p.check(vocab)
        except ValueError as err:
            flag = _FLAG_OF_FIELD.get(str(err).split()[0], "sampling")
            note = f" (prompt {i} uses --sample-seed + {i})" if flag == "--sample-seed" and i else ""
            raise UsageError(f"{flag}: {err}{note}") from err
        params.append(p)
    return params


def _fingerprint(args, run: _Run) -> dict:
    """What every process of a multi-host run must agree on (flag -> value), compared once at its start.

    Output flags (--json, --quiet) may differ: only process 0 prints. A drawn --sample-seed may too:
    process 0's is used everywhere.
    """
    values = {"moejax": _version(), "--model": dataclasses.asdict(run.cfg), "--layout": str(run.layout),
              "--prefill-layout": str(run.prefill_layout),
              "--dtype": run.dtype, "--quantization": args.quantization, "--kv-cache-dtype": args.kv_cache_dtype,
              "--devices": args.devices, "--enable-prefix-caching": args.enable_prefix_caching,
              "--async-scheduling": args.async_scheduling,
              "--across-hosts": ",".join(args.across_hosts),
              "prompts": run.prompts, "--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature,
              "--top-k": args.top_k, "--top-p": args.top_p, "--stop-token-ids": args.stop_token_ids,
              "--chunk-size": args.chunk_size, "--page-size": args.page_size, "--microbatches": args.microbatches}
    if not os.path.isdir(args.model):
        values["--seed"] = args.seed  # random weights: the seed makes them
    if not run.seed_drawn:
        values["--sample-seed"] = run.seed
    return values


def _run_generate(args) -> int:
    from moejax.bench.cli import DeviceSplit

    run = _check_generate(args)  # host only: JAX has not started
    cluster = distributed.cluster_from(args)
    placed = run.layout if run.prefill_layout is None else DeviceSplit(run.prefill_layout, run.layout)
    # --devices counts the run's simulated CPU devices: each process makes its share.
    simulated = request_cpu_devices(distributed.local_device_count(cluster, args.devices, placed.size))
    # Joins the run (refused unless every process runs this command); only process 0 prints from here on.
    shared = distributed.start(cluster, _fingerprint(args, run), {"sample_seed": run.seed},
                               debug=getattr(args, "debug", False))
    if run.seed_drawn and shared["sample_seed"] != run.seed:  # every process samples with process 0's seed
        run.seed = shared["sample_seed"]
        run.params = _sampling(args, run.seed, len(run.prompts), run.cfg.vocab_size)

    import jax

    check_devices(placed, jax.devices(), simulated)
    progress = Progress(enabled=not args.quiet and jax.process_index() == 0)
    prefill_model = None
    if run.prefill_layout is not None:  # the prefill model on the first devices, the decode model on the next
        n = run.prefill_layout.size
        prefill_model = _build_model(args, run, progress, run.prefill_layout, jax.devices()[:n])
        model = _build_model(args, run, progress, run.layout, jax.devices()[n:n + run.layout.size])
    else:
        model = _build_model(args, run, progress)
    engine, ids = _start_engine(model, run.prompts, run.params, args, progress, prefill_model)
    new, texts = _serve(engine, ids, run, args, progress)
    reqs = [engine.requests[i] for i in ids]
    ttft_s = sum(r.ttft_s for r in reqs) / len(reqs)
    tpot_s = sum(r.tpot_s or 0.0 for r in reqs) / len(reqs)
    one = len(new) == 1  # one prompt: flat lists, not lists of one
    result = {
        "model": model.cfg.name, "layout": str(model.layout), "devices": placed.size, "dtype": run.dtype,
        "platform": jax.devices()[0].platform, "prompt_ids": run.prompts[0] if one else run.prompts,
        "tokens": new[0] if one else new, "ttft_s": ttft_s, "tpot_s": tpot_s, "sample_seed": run.seed,
    }
    if texts is not None:
        result["text"] = texts[0] if one else texts
    if prefill_model is not None:
        moved = [r.kv_bytes_moved for r in reqs]
        result.update(prefill_layout=str(prefill_model.layout), prefill_devices=prefill_model.layout.size,
                      decode_devices=model.layout.size, kv_transfers=engine.stats.kv_transfers,
                      kv_transfer_bytes=engine.stats.kv_transfer_bytes, kv_bytes_moved=moved[0] if one else moved)
    if args.enable_prefix_caching:
        stats = engine.stats
        result.update(prompt_tokens=stats.prompt_tokens, cached_prompt_tokens=stats.cached_prompt_tokens,
                      prefill_tokens=stats.prefill_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"  time to first token {ttft_s * 1e3:.1f} ms (after warm-up), time per output token {tpot_s * 1e3:.2f} ms"
          + ("" if args.temperature == 0 else f", sample seed {run.seed}"))
    return 0


class _Counted:
    """A weight source that reports the number of values read (the progress of placing the weights), through
    `read` and, where the source has it, `read_into` (checkpoint sources fill blocks in place)."""

    def __init__(self, source, advance):
        self._source, self._advance = source, advance
        if hasattr(source, "read_into"):
            self.read_into = self._read_into

    def read(self, name, layer, index):
        part = self._source.read(name, layer, index)
        self._advance(part.size)
        return part

    def _read_into(self, name, layer, index, out):
        self._source.read_into(name, layer, index, out)
        self._advance(out.size)

    def __getattr__(self, name):
        return getattr(self._source, name)


def _build_model(args, run: _Run, progress: Progress, layout=None, devices=None):
    """The model on its mesh (`layout`, default --layout, on `devices`, default the first), weights read and placed
    under a progress bar (a checkpoint's or random ones)."""
    from pathlib import Path

    from moejax.inference import Model
    from moejax.weights import RandomSource, parameter_count

    cfg, layout = run.cfg, layout or run.layout
    if Path(args.model).is_dir():
        from moejax.checkpoint.store import open_source

        source, what = open_source(args.model), f"reading weights from {args.model}"
        cfg = source.cfg
    else:
        source, what = RandomSource(cfg, args.seed), f"making random weights for {cfg.name}"
    total = parameter_count(cfg)
    quantized = f", quantized to {args.quantization}" if args.quantization else ""
    with progress.phase(f"{what} ({total / 1e6:.1f}M parameters{quantized}) and placing them on layout {layout}",
                        total=None if args.quantization else total) as advance:  # quantizing reads blocks whole
        model = Model(cfg, _Counted(source, advance), layout=layout, dtype=run.dtype,
                      quantization=args.quantization, devices=devices)
    model.tokenizer = run.tokenizer
    return model


def _start_engine(model, prompts, params, args, progress: Progress, prefill_model=None):
    """A warm engine sized for these prompts (disaggregated with a `prefill_model`), every request added; returns
    (engine, request ids)."""
    import moejax
    from moejax.kv_cache import pages_for

    unit = model.batch_shards * (args.microbatches or model.layout.stage)  # data groups x microbatch groups
    longest = max(map(len, prompts)) + args.max_new_tokens
    rows = -(-len(prompts) // unit) * unit
    per_group = rows // model.batch_shards
    config = moejax.ServeConfig(max_running=rows, page_size=args.page_size, chunk_size=args.chunk_size,
                                num_pages=per_group * pages_for(longest, args.page_size), max_model_len=longest,
                                microbatches=args.microbatches,
                                kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
                                enable_prefix_caching=args.enable_prefix_caching,
                                async_scheduling=args.async_scheduling)
    engine = moejax.Engine(model, config, prefill_model=prefill_model)
    _warmup(engine, progress)
    ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
    return engine, ids


def _warmup(engine, progress: Progress) -> None:
    """`Engine.warmup` as a phase naming its shapes, with a line per program XLA compiles (the long part)."""
    buckets = ", ".join(map(str, engine.decode_buckets))
    with progress.compiling(f"compiling the steps: prefill ({engine.config.max_prefill_seqs} x "
                            f"{engine.config.chunk_size} tokens), decode (batch {buckets})"):
        engine.warmup()


def _serve(engine, ids, run: _Run, args, progress: Progress):
    """Step the engine to the end; returns (new ids per prompt, their texts or None).

    Unless --json, each output is printed once, as it comes: one prompt streams on its line (text with a
    tokenizer, ids otherwise), several get a line each when they finish (their steps interleave).
    """
    import jax

    model, show = engine.model, not args.json
    inline = show and len(ids) == 1
    index = {rid: i for i, rid in enumerate(ids)}
    stream = TextStream(run.tokenizer) if inline and run.tokenizer else None
    if stream:
        stream.push(run.prompts[0])  # the continuation then decodes as it reads after the prompt (spaces included)
    if show:
        side = engine.prefill
        split = "" if side is None else (f"prefill on layout {side.model.layout} ({side.model.layout.size} devices), "
                                         f"decode on the next {model.layout.size}, ")
        print(f"model {model.cfg.name} on {model.layout.size + (side.model.layout.size if side else 0)} "
              f"{jax.devices()[0].platform} devices, {split}layout {model.layout}, {model.dtype_name}", flush=True)
    total = sum(p.max_new_tokens for p in run.params)
    with progress.phase(f"generating (up to {total} tokens for {len(ids)} prompt{'s' * (len(ids) > 1)})", total=total,
                        live=args.json) as advance:
        if inline:
            print(f"  prompt {_shown_prompt(run, 0)} -> ", end="", flush=True)
        first = True  # the first piece's leading space is the arrow's
        while engine.has_unfinished():
            for out in engine.step():
                advance(len(out.new_token_ids))
                if inline:
                    piece = stream.push(out.new_token_ids) if stream else "".join(f" {t}" for t in out.new_token_ids)
                    if piece:
                        print(piece.removeprefix(" ") if first else piece, end="", flush=True)
                        first = False
                    if out.finished:
                        print(f" ({out.finish_reason})", flush=True)
                elif show and out.finished:
                    i, done = index[out.request_id], engine.requests[out.request_id].output_ids
                    shown = repr(decode(run.tokenizer, done)) if run.tokenizer else str(list(done))
                    print(f"  [{i}] prompt {_shown_prompt(run, i)} -> {shown} ({out.finish_reason})", flush=True)
    new = [engine.requests[i].output_ids for i in ids]
    return new, None if run.tokenizer is None else [decode(run.tokenizer, n) for n in new]


def _shown_prompt(run: _Run, i: int) -> str:
    return repr(decode(run.tokenizer, run.prompts[i])) if run.tokenizer else str(list(run.prompts[i]))


# ---- entry point ---------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moejax")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The `moejax` parser with its subcommands (generate, plan, convert, sweep, bench ...) and --version."""
    from moejax import demo
    from moejax.bench import cli as bench_cli
    from moejax.checkpoint import cli as convert_cli
    from moejax.planner import cli as plan_cli

    parser = Parser(prog="moejax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug(parser, default=False)
    parser.add_argument("--version", action="version", version=f"moejax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_debug(_add_generate(sub))
    add_debug(plan_cli.add_parser(sub))
    add_debug(convert_cli.add_parser(sub))
    add_debug(demo.add_parser(sub))  # demo-checkpoint
    for p in bench_cli.add_parsers(sub):  # sweep, bench serve
        add_debug(p)
    return parser


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return _run_generate(args) if args.command == "generate" else args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run `moejax` with `argv` (default: sys.argv[1:]); return the exit status (2: a user mistake, 130: Ctrl-C)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
