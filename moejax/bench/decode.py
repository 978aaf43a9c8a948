"""Decode benchmark on one CPU device: moejax engine vs Hugging Face `generate` vs the memory-bandwidth limit.

    python -m moejax.bench.decode --batch-sizes 1,8,32 --isl 32 --osl 64 --out bench.jsonl

Builds a random Mixtral-format checkpoint from a model config (default `bench-moe-100m`), then for
each batch size: (1) HF transformers `generate` (greedy, eager, float32) on those weights; (2) the
moejax engine on the same checkpoint; (3) the bytes a decode step must read, over a streaming
bandwidth measured in the same run. Bytes per step = weights read once per step (attention, router,
norms, unembedding, the token embeddings), the weights of the experts actually routed to (unique
experts per layer per step, from HF's router on the generated sequences) and the KV of every row.

Host overhead per decode step = engine step wall time - the same compiled call timed alone.
Prints a table and writes one JSON line per (system, batch size) in the planner's calibration schema.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


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


def build_checkpoint(cfg, path: Path, seed: int = 0):
    """Random HF Mixtral checkpoint for a mixtral-family ModelConfig; returns the torch model (float32, eager)."""
    import torch
    import transformers

    if cfg.family != "mixtral":
        raise ValueError(f"the decode benchmark builds Mixtral checkpoints; got family {cfg.family!r}")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


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


def step_bytes(cfg, batch: int, isl: int, osl: int, unique_LS: np.ndarray) -> dict[str, float]:
    """Bytes a decode step must read (float32), averaged over the decode steps."""
    D, V, L, F = cfg.hidden_size, cfg.vocab_size, cfg.num_layers, cfg.moe_intermediate_size
    N, K, H, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts
    attn = L * (2 * D * N * H + 2 * D * K * H)
    other = L * (D * E + 2 * D) + D + D * V + batch * D  # router, norms, final norm, unembedding, embed rows
    experts = float(unique_LS.sum(axis=0).mean()) * 3 * D * F
    context = isl + (osl - 1) / 2  # mean cached length over the decode steps
    kv = batch * context * 2 * L * K * H
    return {k: 4.0 * v for k, v in dict(attention=attn, other=other, experts=experts, kv=kv).items()}


def run_moejax(path: Path, batch: int, prompts: np.ndarray, osl: int, page_size: int = 16) -> dict:
    import moejax
    from moejax.kv_cache import pages_for

    model = _model_cache.get(path) or _model_cache.setdefault(path, moejax.load(path, layout="DP1"))
    isl = prompts.shape[1]
    num_pages = batch * pages_for(isl + osl, page_size)
    config = moejax.ServeConfig(max_running=batch, page_size=page_size, num_pages=num_pages, chunk_size=isl,
                                max_prefill_seqs=batch, max_model_len=isl + osl,
                                decode_buckets=(batch,))
    engine = moejax.Engine(model, config)
    engine.warmup()
    engine.generate(prompts[:, :4].tolist(), moejax.SamplingParams(max_new_tokens=2))  # touch every code path
    stats0 = _snapshot(engine.stats)
    t = time.perf_counter()
    out = engine.generate(prompts.tolist(), moejax.SamplingParams(max_new_tokens=osl))
    wall = time.perf_counter() - t
    reqs = [r for r in engine.requests.values() if r.num_output == osl]
    stats = {k: v - stats0[k] for k, v in _snapshot(engine.stats).items()}
    decode_steps = max(stats["decode_calls"], 1)
    step_wall = (wall - np.mean([r.ttft_s for r in reqs])) / decode_steps
    device = time_decode_call(engine, batch, isl + osl // 2)
    return {"ttft_s": float(np.mean([r.ttft_s for r in reqs])), "tpot_s": float(np.mean([r.tpot_s for r in reqs])),
            "tokens": out, "host_overhead_s": step_wall - device, "host_s_per_step": stats["host_s"] / stats["steps"],
            "device_call_s": device}


_model_cache: dict = {}


def _snapshot(stats) -> dict[str, float]:
    return dict(vars(stats))


def time_decode_call(engine, batch: int, context: int, repeats: int = 20) -> float:
    """The compiled decode call alone (inputs already on device), seconds per call, median."""
    import jax

    from moejax import steps as steps_lib

    put = lambda a, spec=steps_lib.BATCH: steps_lib.put(engine.model.mesh, a, spec)  # noqa: E731
    table = np.arange(batch * engine.pages_per_seq, dtype=np.int32).reshape(batch, -1) % engine.config.num_pages
    with jax.set_mesh(engine.model.mesh):
        args = [put(np.zeros((batch, 1), np.int32)), put(np.full((batch, 1), context, np.int32)), put(table)]
        row = lambda a: put(a, steps_lib.TOKENS_B)  # noqa: E731
        zeros_i = row(np.zeros(batch, np.int32))
        args += [zeros_i, row(np.zeros(batch, np.float32)), zeros_i, row(np.ones(batch, np.float32)),
                 row(np.zeros(batch, np.uint32)), zeros_i]
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ids, engine.cache = engine._fn(engine.model.params, engine.cache, *args)
            ids.block_until_ready()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-moe-100m", help="mixtral-family model config (name or YAML)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--isl", type=int, default=32, help="prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="new tokens")
    p.add_argument("--out", default="", help="append JSON lines here")
    args = p.parse_args(argv)
    import jax

    import moejax

    cfg = moejax.load_model_config(args.model)
    bandwidth = measure_bandwidth()
    limit_bw = max(bandwidth.values())
    print(f"streaming bandwidth: copy {bandwidth['copy'] / 1e9:.1f} GB/s, read {bandwidth['read'] / 1e9:.1f} GB/s; "
          f"limit uses {limit_bw / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch_model = build_checkpoint(cfg, Path(tmp))
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = rng.integers(0, cfg.vocab_size, (batch, args.isl))
            hf = run_hf(torch_model, prompts, args.osl)
            unique = routed_experts(torch_model, hf["sequences"], args.isl)
            ours = run_moejax(Path(tmp), batch, prompts, args.osl)
            nbytes = step_bytes(cfg, batch, args.isl, args.osl, unique)
            limit_s = sum(nbytes.values()) / limit_bw
            same = np.array_equal(np.array(ours["tokens"]), hf["sequences"][:, args.isl:])
            rows.append(dict(batch=batch, hf=hf, ours=ours, bytes=nbytes, limit_s=limit_s, same=same))
            _report(rows[-1])
    if args.out:
        _write_jsonl(args.out, rows, cfg, args, jax.devices()[0].platform)
    return 0


def _report(r: dict) -> None:
    ours, hf = r["ours"], r["hf"]
    print(f"batch {r['batch']:>3}: moejax TPOT {ours['tpot_s'] * 1e3:7.2f} ms "
          f"({r['batch'] / ours['tpot_s']:7.1f} tok/s)"
          f" | HF {hf['tpot_s'] * 1e3:7.2f} ms -> {hf['tpot_s'] / ours['tpot_s']:.2f}x HF"
          f" | bytes/step {sum(r['bytes'].values()) / 1e6:.1f} MB (experts {r['bytes']['experts'] / 1e6:.1f}),"
          f" limit {r['limit_s'] * 1e3:.2f} ms -> {r['limit_s'] / ours['tpot_s']:.0%} of the bandwidth limit"
          f" | host overhead {ours['host_overhead_s'] * 1e3:.2f} ms/step"
          f" (in-step host {ours['host_s_per_step'] * 1e3:.2f})"
          f" | TTFT {ours['ttft_s'] * 1e3:.1f} ms (HF {hf['ttft_s'] * 1e3:.1f}) | tokens == HF: {r['same']}")


def _write_jsonl(path: str, rows: list[dict], cfg, args, platform: str) -> None:
    with open(path, "a") as f:
        for r in rows:
            for system, m in (("moejax", r["ours"]), ("hf-transformers", r["hf"])):
                f.write(json.dumps({
                    "model": cfg.name, "hardware": "cpu-host" if platform == "cpu" else platform,
                    "layout": "DP1" if system == "moejax" else "hf-eager", "precision": "float32",
                    "batch_size": r["batch"], "chunk_size": args.isl, "isl": args.isl, "osl": args.osl,
                    "ttft_s": m["ttft_s"], "tpot_s": m["tpot_s"], "tokens_per_s_per_device": r["batch"] / m["tpot_s"],
                    "tokens_per_s_per_user": 1.0 / m["tpot_s"], "system": system,
                    "bandwidth_limit_fraction": r["limit_s"] / m["tpot_s"],
                }) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
