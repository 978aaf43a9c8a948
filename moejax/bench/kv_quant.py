"""KV cache quantization, measured: greedy tokens and teacher-forced logits with an "fp8" / "int8" KV cache against
the float one, on the same model and prompts.

    moejax bench kv-quant --models tiny-moe,deepseek-count-tiny --layers 4 --prompts 8 --prompt-len 32 --new-tokens 32

For each model (random weights from a built-in config, or a checkpoint directory) and KV cache dtype:
- greedy: the prompts run through the engine (`Engine.generate`, greedy) with the float cache and the quantized
  one; "greedy equal" is the fraction of generated tokens equal to the float run's at the same position, "same
  sequences" the fraction of whole continuations equal (one different token makes the rest of a continuation
  differ: these measure divergence, not per-token error);
- teacher-forced: each float run's sequence (prompt + its greedy tokens) is fed one token per paged step
  (`Steps.step`, the decode path: every position attends over the cache) into a float cache and into a quantized
  one; "top-1" is the fraction of positions whose argmax agrees, and max / mean |logit difference| are taken
  over every position and vocabulary entry (float32 logits).
A "bf16" row (teacher-forced only: pools in bfloat16 under a float32 model, not a runtime choice) shows how much
the same model moves under a rounding of its cache that serving in bfloat16 accepts: random models with many
layers and experts amplify any perturbation (routing flips), which sets the scale of the quantized rows.
"""

from __future__ import annotations

import sys

from moejax.args import Parser, read_model_config, run_main

KV_DTYPES = ("fp8", "int8")


def teacher_forced_logits(model, sequences, kv_cache_dtype: str | None, page_size: int = 16):
    """Logits [B, T, V] (float32 numpy) of `sequences` (B rows of T token ids), fed one token per paged step into a
    fresh cache in `kv_cache_dtype` (None: the serving dtype): position t's logits have read positions 0..t
    from the cache, as in decoding."""
    import numpy as np

    from moejax import steps as steps_lib
    from moejax.config import round_up
    from moejax.kv_cache import pages_for

    steps = model.steps
    ids = np.asarray(sequences, np.int32)
    B, T = ids.shape
    rows = round_up(B, steps.batch_shards)  # padded rows: position -1 (nothing written, nothing read)
    per_group = rows // steps.batch_shards
    pages = pages_for(T, page_size)
    cache = steps.new_cache(rows * pages, page_size, kv_cache_dtype or model.dtype)
    table = (np.arange(rows)[:, None] % per_group * pages + np.arange(pages)[None]).astype(np.int32)
    tokens = np.zeros((rows, T), np.int32)
    tokens[:B] = ids
    table_, index_ = steps.put(table), steps.put(np.zeros(rows, np.int32), steps_lib.TOKENS)
    out = []
    for t in range(T):
        pos = np.where(np.arange(rows)[:, None] < B, t, -1).astype(np.int32)
        logits, _, cache = steps.step(steps.params, cache, steps.put(tokens[:, t:t + 1]), steps.put(pos), table_,
                                      index_)
        out.append(np.asarray(logits, np.float32)[:B])
    return np.stack(out, axis=1)


def greedy(model, prompts, new_tokens: int, kv_cache_dtype: str | None, page_size: int = 16):
    """The engine's greedy continuations of `prompts` with a KV cache in `kv_cache_dtype`, all running at once."""
    from moejax.engine.engine import Engine, ServeConfig
    from moejax.engine.sampling import SamplingParams
    from moejax.kv_cache import pages_for

    groups = model.batch_shards
    per_group = -(-len(prompts) // groups)
    longest = max(map(len, prompts)) + new_tokens
    config = ServeConfig(max_running=per_group * groups, page_size=page_size,
                         num_pages=per_group * pages_for(longest, page_size), chunk_size=max(map(len, prompts)),
                         max_prefill_seqs=per_group, max_model_len=longest, decode_buckets=(per_group,),
                         microbatches=1, max_finished_retained=len(prompts), kv_cache_dtype=kv_cache_dtype)
    return Engine(model, config).generate(prompts, SamplingParams(max_new_tokens=new_tokens))


def measure(model, prompts, new_tokens: int, kv_dtypes=("bf16", *KV_DTYPES)) -> list[dict]:
    """One row per KV dtype: greedy agreement (quantized ones) and teacher-forced logit error against the float
    cache ("bf16": bfloat16 pools, teacher-forced only)."""
    import jax.numpy as jnp
    import numpy as np

    reference = greedy(model, prompts, new_tokens, None)
    sequences = [p + r for p, r in zip(prompts, reference, strict=True)]
    float_logits = teacher_forced_logits(model, sequences, None)
    rows = []
    for kv in kv_dtypes:
        tokens = None if kv == "bf16" else greedy(model, prompts, new_tokens, kv)
        logits = teacher_forced_logits(model, sequences, jnp.bfloat16 if kv == "bf16" else kv)
        diff = np.abs(logits - float_logits)
        rows.append({
            "model": model.cfg.name or model.cfg.family, "attention": model.cfg.attention, "kv_cache_dtype": kv,
            "greedy_equal": None if tokens is None else float(np.mean([
                a == b for x, y in zip(reference, tokens, strict=True) for a, b in zip(x, y, strict=True)])),
            "same_sequences": None if tokens is None else float(np.mean([
                x == y for x, y in zip(reference, tokens, strict=True)])),
            "top1": float(np.mean(logits.argmax(-1) == float_logits.argmax(-1))),
            "max_logit_diff": float(diff.max()), "mean_logit_diff": float(diff.mean()),
            "logit_range": float(np.abs(float_logits).max())})
    return rows


def main(argv=None, prog: str = "moejax bench kv-quant") -> int:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-moe,deepseek-count-tiny",
                   help="comma-separated built-in config names (random weights) or checkpoint directories")
    p.add_argument("--layers", type=int, default=None,
                   help="keep the first N layers of a built-in config (random weights); default: all")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="weights (config names) and prompts")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args(argv)
    names = [s for s in args.models.split(",") if s]
    for name in names:
        read_model_config(name)  # an unknown name is refused before JAX starts
    import json
    import os

    import numpy as np

    import moejax

    print(f"{'model':<22} {'attention':<9} {'KV':<5} {'greedy equal':>12} {'same seqs':>9} {'top-1 (TF)':>10} "
          f"{'max |dlogit|':>12} {'mean |dlogit|':>13} {'max |logit|':>11}")
    for name in names:
        if os.path.isdir(name):
            model = moejax.load(name)
        else:
            cfg = read_model_config(name)
            model = moejax.Model.random(cfg.replace(num_layers=args.layers) if args.layers else cfg, seed=args.seed)
        vocab = model.cfg.vocab_size
        rng = np.random.default_rng(args.seed)
        prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.prompts)]
        for row in measure(model, prompts, args.new_tokens):
            if args.json:
                print(json.dumps(row))
                continue
            greedy_cols = ("-", "-") if row["greedy_equal"] is None else (
                f"{row['greedy_equal']:.3f}", f"{row['same_sequences']:.3f}")
            print(f"{row['model']:<22} {row['attention']:<9} {row['kv_cache_dtype']:<5} {greedy_cols[0]:>12} "
                  f"{greedy_cols[1]:>9} {row['top1']:>10.4f} {row['max_logit_diff']:>12.4f} "
                  f"{row['mean_logit_diff']:>13.5f} {row['logit_range']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
