"""Decode benchmark on one CPU device: moejax engine vs Hugging Face `generate` vs the memory-bandwidth limit.

    python -m moejax.bench.decode --batch-sizes 1,8,32 --isl 32 --osl 64 --out bench.jsonl
    python -m moejax.bench.decode --batch-sizes 1,8,32 --no-hf     # engine only: step time and host overhead
    python -m moejax.bench.decode --batch-sizes 1,8,32 --vs-vllm /path/to/vllm-env/bin/python   # + vLLM-CPU
    python -m moejax.bench.decode --batch-sizes 1,8 --dtype bfloat16 --vs-vllm ...   # every system in bfloat16

Builds a random Mixtral-format checkpoint from a model config (default `bench-moe-100m`), then for
each batch size: (1) HF transformers `generate` (greedy, eager) on those weights; (2) the
moejax engine on the same checkpoint; (3) the bytes a decode step must read, over a streaming
bandwidth measured in the same run. Bytes per step = weights read once per step (attention, router,
norms, unembedding, the token embeddings), the weights of the experts actually routed to (unique
experts per layer per step, from HF's router on the generated sequences) and the KV of every row.
Every system runs in one dtype, `--dtype` (auto: the model config's own, `ModelConfig.serving_dtype`; float32 for
the built-in configs), resolved once before anything runs and recorded in every JSON line (`dtype`, `precision`);
the checkpoint is written in float32 and rounded to it as each system loads it.

Host overhead per decode step = engine step wall time - the time of that step's compiled call,
replayed alone on the very inputs the step used (median over the decode steps; see `run_moejax`).
The call's launch (host work of the XLA runtime, inside the call time) and the engine's own in-step
accounting (`EngineStats.host_s` per step) are reported beside it.
With `--vs-vllm PYTHON` (an environment with `vllm-cpu`, see `moejax.bench.vs_vllm`), vLLM's CPU engine
runs the same prompts on the same checkpoint in the same run, after a warm-up, in the CPU setup vLLM's
guide asks for (`moejax.bench.vs_vllm.vllm_setup`: tcmalloc and libiomp5 preloaded, threads bound; printed,
and stored as `vllm_preload` / `vllm_threads_bind` in its JSON lines): its TPOT, TTFT and tokens/s,
moejax / vLLM ratios, and whether its greedy tokens equal moejax's. For several alternating
rounds (the figures to trust on a shared machine) use `python -m moejax.bench.vs_vllm`.
Prints a table and writes one JSON line per (system, batch size) in the planner's calibration schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax.args import Parser, add_dtype, int_in, int_list, read_model_config, resolved_dtype, run_main
from moejax.bench.hf_checkpoint import build_checkpoint
from moejax.config import KV_CACHE_DTYPES, QUANTIZATIONS


def measure_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> dict[str, float]:
    """Streaming bandwidth (bytes/s): numpy copy (read + write) and a jitted JAX sum (read only), best of n."""
    import jax
    import jax.numpy as jnp

    a = np.ones(num_bytes // 4, np.float32)
    b = np.empty_like(a)
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    x = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = min(_timed(lambda: total(x).block_until_ready()) for _ in range(repeats))
    return {"copy": 2 * num_bytes / copy, "read": num_bytes / read}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_hf(model, prompts: np.ndarray, osl: int) -> dict:
    """HF greedy generate: TTFT (1 new token) and TPOT ((osl - 1) more tokens); also the generated ids."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=osl, min_new_tokens=osl, **kw)
        total = time.perf_counter() - t
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (osl - 1), "sequences": out.numpy()}


def routed_experts(model, sequences: np.ndarray, isl: int) -> np.ndarray:
    """Unique experts per layer at each decode step [L, osl - 1], from HF's router on the sequences."""
    import torch

    B, T = sequences.shape
    with torch.no_grad():
        out = model(torch.tensor(sequences, dtype=torch.long), output_router_logits=True)
    k = model.config.num_experts_per_tok
    unique = []
    for logits in out.router_logits:  # [B * T, E] per layer
        chosen = torch.topk(logits.reshape(B, T, -1), k, dim=-1).indices.numpy()  # [B, T, k]
        # Decode step s feeds the token at position isl + s (s = 0: the first generated token).
        unique.append([len(np.unique(chosen[:, t])) for t in range(isl, T - 1)])
    return np.array(unique)


def step_bytes(cfg, batch: int, isl: int, osl: int, unique_LS: np.ndarray, itemsize: int = 4) -> dict[str, float]:
    """Bytes a decode step must read (weights and KV of `itemsize` bytes per value), averaged over the decode
    steps."""
    D, V, L, F = cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.moe_intermediate_size
    N, K, H, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts
    attn = L * (2 * D * N * H + 2 * D * K * H)
    other = L * (D * E + 2 * D) + D + D * V + batch * D  # router, norms, final norm, unembedding, embed rows
    experts = float(unique_LS.sum(axis=0).mean()) * 3 * D * F
    context = isl + (osl - 1) / 2  # mean cached length over the decode steps
    kv = batch * context * 2 * L * K * H
    return {k: float(itemsize) * v for k, v in dict(attention=attn, other=other, experts=experts, kv=kv).items()}


def run_moejax(path: Path, batch: int, prompts: np.ndarray, osl: int, page_size: int = 16,
               replays: int = 3, quantization: str | None = None, kv_cache_dtype: str | None = None,
               dtype: str = "auto") -> dict:
    """The moejax engine on `prompts`: TTFT, TPOT, tokens, and the host overhead of its decode steps.

    Drives `Engine.step()` itself (as `generate` does) and times every step. Right after each
    decode-only step, that step's compiled call is replayed alone `replays` times on the very
    inputs it used (already on device): the median is the step's device time. So the tokens,
    positions and page tables (hence the experts routed to and the KV read) are the run's, and
    the pair (step wall, device time) is taken within milliseconds, which keeps load from other
    processes from landing on one side only. Host overhead per decode step = median over the
    decode steps of (step wall - device time); `host_s_per_step` is the engine's own in-step
    accounting (`EngineStats.host_s`), which includes launching the compiled call
    (`dispatch_s_per_step`). The replayed call time includes its launch, which is host work of the
    XLA runtime: `launch_s` (see `time_decode_call`) is reported so it can be added back.
    TPOT is the mean decode-step wall (the replays sit between steps, so the requests' token
    times would count them).
    """
    import moejax
    from moejax.kv_cache import pages_for

    key = (path, quantization, dtype)
    model = _model_cache.get(key) or _model_cache.setdefault(key, moejax.load(path, layout="DP1", dtype=dtype,
                                                                               quantization=quantization))
    isl = prompts.shape[1]
    num_pages = batch * pages_for(isl + osl, page_size)
    config = moejax.ServeConfig(max_running=batch, page_size=page_size, num_pages=num_pages, chunk_size=isl,
                                max_prefill_seqs=batch, max_model_len=isl + osl,
                                decode_buckets=(batch,), kv_cache_dtype=kv_cache_dtype)
    engine = moejax.Engine(model, config)
    engine.warmup()
    # Warm-up as HF's (`run_hf`): the same prompts, 2 new tokens. Compilation is done by `warmup()`,
    # but XLA:CPU sets up each fusion's runtime state on its first execution, and all-padding
    # warm-up batches run no expert: without this the first prefill costs 2-3x (80-250 ms more).
    engine.generate(prompts.tolist(), moejax.SamplingParams(max_new_tokens=2))
    fn, calls = engine._fn, []

    def recording(*args, **kwargs):  # records each compiled call's batch inputs (not params / cache)
        calls.append((tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args[2:]), kwargs))
        return fn(*args, **kwargs)

    ids = [engine.add_request(p, moejax.SamplingParams(max_new_tokens=osl)) for p in prompts.tolist()]
    walls, hosts, device, launch = [], [], [], []  # per decode-only step
    while not all(engine.requests[i].finished for i in ids):
        prefills, n = engine.stats.prefill_calls, len(calls)
        host, dispatch = engine.stats.host_s, engine.stats.dispatch_s
        engine._fn = recording
        t = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t
        engine._fn = fn
        if engine.stats.prefill_calls == prefills and len(calls) == n + 1:
            walls.append(wall)
            hosts.append((engine.stats.host_s - host, engine.stats.dispatch_s - dispatch))
            call_s, launch_s = time_decode_call(engine, calls[-1], replays)
            device.append(call_s)
            launch.append(launch_s)
    reqs = [engine.requests[i] for i in ids]
    overhead = np.array(walls) - np.array(device)
    return {"ttft_s": float(np.mean([r.ttft_s for r in reqs])), "tpot_s": float(np.mean(walls)),
            "tokens": [r.output_ids for r in reqs], "decode_steps": len(walls),
            "step_wall_s": float(np.median(walls)), "device_call_s": float(np.median(device)),
            "host_overhead_s": float(np.median(overhead)), "host_overhead_mean_s": float(np.mean(overhead)),
            "launch_s": float(np.median(launch)),
            "host_s_per_step": float(np.mean([h for h, _ in hosts])),
            "dispatch_s_per_step": float(np.mean([d for _, d in hosts]))}


_model_cache: dict = {}


def time_decode_call(engine, inputs, repeats: int = 3) -> tuple[float, float]:
    """One recorded compiled call replayed alone: (call seconds, median of `repeats`; launch seconds).

    `inputs` is (positional args after params and cache, keyword args) as the engine passed them;
    host (numpy) arrays are put on device first, split over `data` by rows, so only the call is
    timed. Replaying a step rewrites the same KV entries with the same values, so the cache the
    step left is unchanged and every replay reads what the original step read.

    The call time includes launching it, which on XLA:CPU is host work of the runtime (and may
    start the computation in the calling thread). Launch = the time to return from a call whose
    input (the cache) is still being written by the call before it: the runtime's own work only.
    """
    import jax

    from moejax import steps as steps_lib

    mesh = engine.model.mesh
    args, kwargs = inputs
    with jax.set_mesh(mesh):
        args = [engine.model.steps.put(a, steps_lib.BATCH if a.ndim == 2 else steps_lib.TOKENS)
                if isinstance(a, np.ndarray) else a for a in args]
        jax.block_until_ready(args)
        call = lambda: engine._fn(engine.model.params, engine.cache, *args, **kwargs)  # noqa: E731
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ids, engine.cache = call()
            ids.block_until_ready()
            times.append(time.perf_counter() - t)
        ids, engine.cache = call()
        t = time.perf_counter()
        ids, engine.cache = call()
        launch = time.perf_counter() - t
        ids.block_until_ready()
    return float(np.median(times)), launch


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog or "python -m moejax.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-moe-100m", help="mixtral-family model config (name or YAML)")
    p.add_argument("--batch-sizes", type=int_list(1, 4096), default=[1, 8, 32], help="requests decoded at once")
    p.add_argument("--isl", type=int_in(1, 1 << 16), default=32, help="prompt tokens")
    p.add_argument("--osl", type=int_in(2, 1 << 16), default=64, help="new tokens (>= 2: TPOT needs two)")
    p.add_argument("--out", default="", help="append JSON lines here")
    p.add_argument("--no-hf", action="store_true",
                   help="moejax only: skip HF generate, the routed-expert count and the bandwidth limit")
    p.add_argument("--vs-vllm", default="", metavar="PYTHON",
                   help="also run vLLM's CPU engine with this python (an environment with vllm-cpu)")
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="also decode with the weights quantized at load: speed and tokens against float, same run")
    p.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help="also decode with the KV cache quantized (with --quantization: both in one variant)")
    add_dtype(p)  # moejax, Hugging Face and vLLM alike
    args = p.parse_args(argv)
    if args.vs_vllm and not os.access(args.vs_vllm, os.X_OK):
        p.error(f"--vs-vllm {args.vs_vllm!r} is not an executable python; give the python of an environment "
                "with vllm-cpu installed (see moejax.bench.vs_vllm)")
    batches = args.batch_sizes
    cfg = read_model_config(args.model)  # before JAX starts: a mistake costs nothing
    if cfg.family != "mixtral":
        p.error(f"--model {args.model!r} is a {cfg.family} model; this benchmark builds a Mixtral-format checkpoint "
                f"(Hugging Face and vLLM read it): give a mixtral-family config, e.g. bench-moe-100m")
    if cfg.max_position_embeddings < args.isl + args.osl:
        p.error(f"--isl {args.isl} + --osl {args.osl} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}")
    dtype = resolved_dtype(args.dtype, cfg)  # once, before anything runs: every system and row uses it
    print(f"dtype: {dtype}")
    import jax

    limit_bw = None
    if not args.no_hf:
        bandwidth = measure_bandwidth()
        limit_bw = max(bandwidth.values())
        print(f"streaming bandwidth: copy {bandwidth['copy'] / 1e9:.1f} GB/s, read {bandwidth['read'] / 1e9:.1f} GB/s; "
              f"limit uses {limit_bw / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        torch_model = _in_dtype(build_checkpoint(cfg, Path(tmp)), dtype)  # saved in float32, run in `dtype`
        vllm = None
        if args.vs_vllm:
            from moejax.bench.vs_vllm import VLLM, settle

            vllm = VLLM(args.vs_vllm, Path(tmp), max(batches), args.isl + args.osl, dtype=dtype)  # prints its setup
            stack.callback(vllm.close)
        for batch in batches:
            prompts = rng.integers(0, cfg.vocab_size, (batch, args.isl))
            if vllm is not None:
                settle()  # vLLM's processes stay busy ~1 s after a batch (moejax.bench.vs_vllm)
            ours = run_moejax(Path(tmp), batch, prompts, args.osl, dtype=dtype)
            row = dict(batch=batch, dtype=dtype, ours=ours, hf=None, vllm=None)
            if args.quantization or args.kv_cache_dtype:
                row["quantized"] = run_moejax(Path(tmp), batch, prompts, args.osl, quantization=args.quantization,
                                              kv_cache_dtype=args.kv_cache_dtype, dtype=dtype)
                row["quantization"] = " + ".join(
                    ([args.quantization] if args.quantization else [])
                    + ([f"{args.kv_cache_dtype} KV"] if args.kv_cache_dtype else []))
                row["weights"], row["kv"] = args.quantization, args.kv_cache_dtype
            if vllm is not None:
                vllm.run(prompts.tolist(), 4)  # warm-up: its compiled graphs for this batch size
                settle()
                row["vllm"] = vllm.run(prompts.tolist(), args.osl)
            if not args.no_hf:
                hf = run_hf(torch_model, prompts, args.osl)
                unique = routed_experts(torch_model, hf["sequences"], args.isl)
                nbytes = step_bytes(cfg, batch, args.isl, args.osl, unique, _BYTES[dtype])
                row.update(hf=hf, bytes=nbytes, limit_s=sum(nbytes.values()) / limit_bw,
                           same=np.array_equal(np.array(ours["tokens"]), hf["sequences"][:, args.isl:]))
            rows.append(row)
            _report(rows[-1])
    if args.out:
        _write_jsonl(args.out, rows, cfg, args, jax.devices()[0].platform)
    return 0


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per value of each serving dtype


def _in_dtype(model, dtype: str):
    """The torch model cast to the serving dtype (Hugging Face runs in what moejax and vLLM run in)."""
    import torch

    return model if dtype == "float32" else model.to(getattr(torch, dtype))


def _report(r: dict) -> None:
    ours, hf = r["ours"], r["hf"]
    line = (f"batch {r['batch']:>3}: moejax TPOT {ours['tpot_s'] * 1e3:7.2f} ms"
            f" ({r['batch'] / ours['tpot_s']:7.1f} tok/s)")
    if hf is not None:
        line += (f" | HF {hf['tpot_s'] * 1e3:7.2f} ms -> {hf['tpot_s'] / ours['tpot_s']:.2f}x HF"
                 f" | bytes/step {sum(r['bytes'].values()) / 1e6:.1f} MB (experts {r['bytes']['experts'] / 1e6:.1f}),"
                 f" limit {r['limit_s'] * 1e3:.2f} ms -> {r['limit_s'] / ours['tpot_s']:.0%} of the bandwidth limit")
    line += (f" | decode step {ours['step_wall_s'] * 1e3:.2f} ms = call {ours['device_call_s'] * 1e3:.2f}"
             f" (launch {ours['launch_s'] * 1e3:.2f}) + host overhead {ours['host_overhead_s'] * 1e3:.2f} ms/step"
             f" (mean {ours['host_overhead_mean_s'] * 1e3:.2f}; in-step host {ours['host_s_per_step'] * 1e3:.2f},"
             f" of which in the call {ours['dispatch_s_per_step'] * 1e3:.2f})")
    line += f" | TTFT {ours['ttft_s'] * 1e3:.1f} ms"
    if hf is not None:
        line += f" (HF {hf['ttft_s'] * 1e3:.1f}) | tokens == HF: {r['same']}"
    q = r.get("quantized")
    if q is not None:
        same = np.mean(np.array(q["tokens"]) == np.array(ours["tokens"]))
        line += (f" | {r['quantization']}: TPOT {q['tpot_s'] * 1e3:.2f} ms, TTFT {q['ttft_s'] * 1e3:.1f} ms, tokens/s "
                 f"{ours['tpot_s'] / q['tpot_s']:.2f}x float, tokens equal to float's {same:.0%}")
    v = r.get("vllm")
    if v is not None:
        line += (f" | vLLM TPOT {v['tpot_s'] * 1e3:.2f} ms, TTFT {v['ttft_s'] * 1e3:.1f} ms: moejax / vLLM tokens/s "
                 f"{v['tpot_s'] / ours['tpot_s']:.2f} (per-request TPOT), vLLM / moejax TTFT "
                 f"{v['ttft_s'] / ours['ttft_s']:.2f}, tokens == moejax: {v['tokens'] == ours['tokens']}")
    print(line, flush=True)


def _write_jsonl(path: str, rows: list[dict], cfg, args, platform: str) -> None:
    with open(path, "a") as f:
        for r in rows:
            for system, m in (("moejax", r["ours"]), ("hf-transformers", r["hf"]), ("vllm-cpu", r.get("vllm")),
                              ("moejax", r.get("quantized"))):
                if m is None:  # --no-hf, no --vs-vllm, no --quantization
                    continue
                variant = m is r.get("quantized")
                dtype = r.get("dtype", "float32")  # every system's (a row made before --dtype: float32)
                precision = (r["weights"] or dtype) if variant else dtype
                kv_precision = (r["kv"] or dtype) if variant else dtype
                f.write(json.dumps({
                    "model": cfg.name, "hardware": "cpu-host" if platform == "cpu" else platform,
                    "layout": {"moejax": "DP1", "hf-transformers": "hf-eager"}.get(system, system),
                    "precision": precision, "kv_precision": kv_precision,
                    "batch_size": r["batch"], "chunk_size": args.isl, "isl": args.isl, "osl": args.osl,
                    "ttft_s": m["ttft_s"], "tpot_s": m["tpot_s"], "tokens_per_s_per_device": r["batch"] / m["tpot_s"],
                    "tokens_per_s_per_user": 1.0 / m["tpot_s"], "system": system, "dtype": dtype,
                    "bandwidth_limit_fraction": r["limit_s"] / m["tpot_s"] if "limit_s" in r else None,
                    **({k: m[k] for k in _HOST_FIELDS} if system == "moejax" else {}),
                    **({f"vllm_{k}": m[k] for k in ("preload", "threads_bind")} if system == "vllm-cpu" else {}),
                }) + "\n")


_HOST_FIELDS = ("step_wall_s", "device_call_s", "launch_s", "host_overhead_s", "host_overhead_mean_s",
                "host_s_per_step", "dispatch_s_per_step", "decode_steps")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
