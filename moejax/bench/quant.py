"""Post-training quantization against float: accuracy of int8 / fp8 / int4 weights, and their memory per device
measured against the planner's.

    moejax bench quant [--families mixtral,qwen3_moe,deepseek_v3,gpt_oss,olmoe] [--train-steps 150]
                       [--layouts DP1,TP2,EP2,TP2EP2] [--quantizations int8,fp8,int4] [--no-kv]

The models. One tiny model per family, that family's built-in config (`configs/models`) at tiny widths
(`tiny_config`: hidden 128, 4 heads of 32, 8 experts of width 256 top-2, 3 layers; DeepSeek-V3 with MLA, its
grouped sigmoid router, a dense first layer and a shared expert; gpt-oss with sinks, biases, its clamped SwiGLU
and sliding windows on alternate layers; Qwen3-MoE and OLMoE with their q/k norms). Each is trained here (`train`:
150 Adam steps by default, through the XLA path of the runtime's own forward) on the English text moejax ships
(`moejax.demo.corpus_text`, tokenized by the demo BPE tokenizer, 256 tokens). Trained, because a random model's
logits are near flat: its top-1 margin is a small fraction of the logits' spread whatever the weights' scale (the
logits are a random projection of the last hidden state), so top-1 agreement would measure that flatness, not
the quantization. The trained weights are then the checkpoint both sides load (`TrainedSource`).

Accuracy. Teacher-forced logits (`Model.forward`, one device, float32) of the same 8 windows of 32 corpus tokens
from the float model and from the model quantized at load (`moejax.load(..., quantization=Q)`): top-1 agreement
(positions whose argmax is the same), max and mean |logit difference|, beside the float model's mean top-1
probability (how peaked its logits are). With `kv_cache_dtype` rows: the float weights with an fp8 / int8 KV cache,
greedy generation through the engine against the float cache's (positions equal, sequences whole).

Memory. The same model placed in bfloat16 (the planner's serving dtype) on each layout and quantization
(simulated CPU devices): the bytes of the placed weights on the fullest device, summed over the arrays' shards,
against the planner's weights per device (`moejax.planner.memory.weights_per_device`) for the same model, layout
and precision. int4 is counted at half a byte per value: XLA packs int4 two values to a byte (the resident memory
of a process holding int4 arrays grows by half their element count), while `nbytes` and `on_device_size_in_bytes()`
report one byte per value.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from moejax.args import Parser, int_in, read_model_config, run_main
from moejax.config import QUANTIZATIONS, ModelConfig

# family -> (its built-in config, what the tiny model changes beyond TINY)
FAMILIES = {
    "mixtral": ("mixtral-8x7b", {}),
    "qwen3_moe": ("qwen3-30b-a3b", {}),
    "deepseek_v3": ("deepseek-v3", dict(num_layers=4, num_kv_heads=4, first_dense_layers=1,
                                        dense_intermediate_size=256, shared_expert_intermediate_size=256,
                                        kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32,
                                        n_group=4, topk_group=2, rope_original_max_position_embeddings=128)),
    "gpt_oss": ("gpt-oss-20b", dict(num_layers=4, sliding_window=16, sliding_layers=(0, 2),
                                    rope_original_max_position_embeddings=128)),
    "olmoe": ("olmoe-1b-7b", dict(num_kv_heads=4)),
}
TINY = dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, moe_intermediate_size=256,
            num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
VOCAB = 256  # the demo tokenizer's size on the shipped text
LAYOUTS = ("DP1", "TP2", "EP2", "TP2EP2")
KV_DTYPES = ("fp8", "int8")


def tiny_config(family: str, vocab: int = VOCAB) -> ModelConfig:
    """`family`'s built-in config at tiny widths (`FAMILIES`, `TINY`), with vocabulary `vocab`."""
    name, extra = FAMILIES[family]
    cfg = read_model_config(name).replace(name=f"tiny-{family}", vocab_size=vocab, **{**TINY, **extra})
    cfg.check_runtime_support()
    return cfg


def corpus_ids(vocab: int = VOCAB) -> np.ndarray:
    """The shipped English text as token ids of the demo tokenizer (`moejax.demo.train_tokenizer(vocab)`)."""
    from moejax.demo import corpus_text, train_tokenizer

    tok = train_tokenizer(vocab)
    return np.concatenate([tok.encode(line).ids for line in corpus_text().splitlines() if line.strip()]).astype(
        np.int32)


def windows(ids: np.ndarray, rows: int, tokens: int) -> np.ndarray:
    """`rows` windows of `tokens` ids, evenly spaced over `ids`: [rows, tokens]."""
    starts = np.linspace(0, len(ids) - tokens - 1, rows).astype(int)
    return np.stack([ids[s:s + tokens] for s in starts])


@contextlib.contextmanager
def _xla_path():
    """The runtime's pure-XLA path (no native kernels: they have no gradient), for the traces made inside."""
    from moejax import native

    before = os.environ.get(native.ENV)
    os.environ[native.ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(native.ENV, None)
        else:
            os.environ[native.ENV] = before


class TrainedSource:
    """Canonical tensors (a `moejax.weights.WeightSource`) of a float model's weights placed on DP1, where
    nothing is padded or repeated: a stacked weight's slot is its layer's canonical tensor."""

    def __init__(self, params: dict, geometry):
        import jax

        from moejax.weights import STACKS

        self.tensors: dict[tuple[str, int | None], np.ndarray] = {}
        for path, array in jax.tree_util.tree_flatten_with_path(params)[0]:
            keys = [str(p.key) for p in path]
            if keys[0] in STACKS:
                for layer, slot in geometry.stack(keys[0]).slot_of_layer().items():
                    self.tensors[(".".join(keys[1:]), layer)] = np.asarray(array[slot])
            else:
                self.tensors[(".".join(keys), None)] = np.asarray(array)

    def read(self, name: str, layer: int | None, index) -> np.ndarray:
        return self.tensors[(name, layer)][index]


def train(cfg: ModelConfig, ids: np.ndarray, steps: int, seed: int = 0, batch: int = 16, tokens: int = 32,
          learning_rate: float = 3e-3) -> tuple[TrainedSource, float, float]:
    """Train `cfg` from random weights on next-token prediction over random windows of `ids` (Adam, cosine decay):
    (the trained weights, the first step's loss, the mean loss of the last 10 steps)."""
    import jax
    import jax.numpy as jnp
    import optax

    from moejax.inference import Model

    with _xla_path():
        model = Model.random(cfg, seed=seed, layout="DP1", moe_strategy="gather")  # differentiable on XLA
        fwd = model.steps._forward
        pos = np.broadcast_to(np.arange(tokens, dtype=np.int32), (batch, tokens))
        opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))

        def loss_fn(params, seq):
            logits = fwd(params, seq[:, :-1], pos).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

        @jax.jit
        def step(params, state, seq):
            loss, grads = jax.value_and_grad(loss_fn)(params, seq)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        rng = np.random.default_rng(seed)
        params, state, losses = model.params, opt.init(model.params), []
        with jax.set_mesh(model.mesh):
            for _ in range(steps):
                starts = rng.integers(0, len(ids) - tokens - 1, batch)
                params, state, loss = step(params, state, np.stack([ids[s:s + tokens + 1] for s in starts]))
                losses.append(loss)
        losses = [float(x) for x in losses]
    return TrainedSource(params, model.geometry), losses[0], float(np.mean(losses[-10:]))


def accuracy(ref_BTV: np.ndarray, got_BTV: np.ndarray) -> dict:
    """Top-1 agreement and |logit difference| of logits `got` against `ref` ([B, T, V] each)."""
    diff = np.abs(got_BTV - ref_BTV)
    return {"top1_agreement": float(np.mean(ref_BTV.argmax(-1) == got_BTV.argmax(-1))),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def top1_probability(logits_BTV: np.ndarray) -> float:
    z = logits_BTV - logits_BTV.max(-1, keepdims=True)
    p = np.exp(z)
    return float(np.mean(p.max(-1) / p.sum(-1)))


def measured_weight_bytes(model) -> int:
    """Bytes of `model`'s placed weights on its fullest device: each shard's elements at their storage size, int4
    and fp4 (MXFP4 checkpoints) at half a byte (XLA packs two to a byte, measured on CPU: 400M values hold 191 MiB;
    a shard's `nbytes` reports one byte per value)."""
    import jax
    import jax.numpy as jnp

    per_device: dict = {}
    for array in jax.tree.leaves(model.params):
        for shard in array.addressable_shards:
            data = shard.data
            size = -(-data.size // 2) if data.dtype in (jnp.int4, jnp.float4_e2m1fn) else data.nbytes
            per_device[shard.device] = per_device.get(shard.device, 0) + size
    return max(per_device.values())


def memory_rows(cfg: ModelConfig, source, layouts, quantizations) -> list[dict]:
    """Measured and planned weight bytes per device, bfloat16 serving, for each layout x quantization."""
    from moejax.inference import Model
    from moejax.mesh import Layout
    from moejax.planner.memory import weights_per_device
    from moejax.planner.workload import Workload

    rows = []
    for layout in layouts:
        for q in quantizations:
            model = Model(cfg, source, layout=layout, dtype="bfloat16", quantization=q)
            measured = measured_weight_bytes(model)
            planned = weights_per_device(cfg, Layout.parse(layout), Workload(precision=q or "bf16"))
            rows.append({"family": cfg.family, "layout": layout, "quantization": q or "bf16", "measured": measured,
                         "planned": planned, "error": planned / measured - 1})
            del model
    return rows


def _kv_rows(cfg: ModelConfig, source, prompts: list[list[int]], new_tokens: int, kv_dtypes) -> list[dict]:
    """Greedy tokens through the engine with a quantized KV cache (float weights) against the float cache's."""
    from moejax.inference import Model

    ref = Model(cfg, source).generate(prompts, max_new_tokens=new_tokens)
    rows = []
    for kv in kv_dtypes:
        got = Model(cfg, source, kv_cache_dtype=kv).generate(prompts, max_new_tokens=new_tokens)
        equal = [a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True)]
        rows.append({"family": cfg.family, "kv": kv, "positions_equal": float(np.mean(equal)),
                     "sequences_equal": sum(r == g for r, g in zip(ref, got, strict=True)), "sequences": len(ref)})
    return rows


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(families, quantizations, layouts, steps: int, rows: int, tokens: int, kv_dtypes) -> dict:
    """Every table of this benchmark as lists of dicts: accuracy, kv, memory, training."""
    from moejax.inference import Model

    ids = corpus_ids()
    prompts = windows(ids, rows, tokens)
    out = {"accuracy": [], "kv": [], "memory": [], "training": []}
    for family in families:
        cfg = tiny_config(family)
        t = time.perf_counter()
        source, first, last = train(cfg, ids, steps)
        out["training"].append({"family": family, "steps": steps, "first_loss": first, "last_loss": last,
                                "seconds": time.perf_counter() - t})
        _log(f"{family}: trained {steps} steps, loss {first:.2f} -> {last:.2f} ({time.perf_counter() - t:.0f} s)")
        ref = Model(cfg, source).forward(prompts)
        peak = top1_probability(ref)
        for q in quantizations:
            got = Model(cfg, source, quantization=q).forward(prompts)
            out["accuracy"].append({"family": family, "quantization": q, "float_top1_probability": peak,
                                    **accuracy(ref, got)})
            _log(f"{family} {q}: {out['accuracy'][-1]}")
        if kv_dtypes:
            out["kv"] += _kv_rows(cfg, source, [list(p[:tokens // 2]) for p in prompts], tokens // 2, kv_dtypes)
        out["memory"] += memory_rows(cfg, source, layouts, (None, *quantizations))
    return out


def format_tables(out: dict) -> str:
    """The markdown tables of `run`'s output."""
    lines = ["| family | weights | top-1 agreement | max abs logit diff | mean abs logit diff | float top-1 prob |",
             "|---|---|---:|---:|---:|---:|"]
    for r in out["accuracy"]:
        lines.append(f"| {r['family']} | {r['quantization']} | {r['top1_agreement']:.1%} | {r['max_abs_diff']:.3f} | "
                     f"{r['mean_abs_diff']:.4f} | {r['float_top1_probability']:.2f} |")
    if out["kv"]:
        lines += ["", "| family | KV cache | greedy tokens equal to the float cache's | sequences equal |",
                  "|---|---|---:|---:|"]
        for r in out["kv"]:
            lines.append(f"| {r['family']} | {r['kv']} | {r['positions_equal']:.1%} | "
                         f"{r['sequences_equal']} of {r['sequences']} |")
    lines += ["", "| family | layout | weights | measured bytes/device | planner bytes/device | planner error |",
              "|---|---|---|---:|---:|---:|"]
    for r in out["memory"]:
        lines.append(f"| {r['family']} | {r['layout']} | {r['quantization']} | {r['measured']:,} | "
                     f"{r['planned']:,.0f} | {r['error']:+.2%} |")
    lines += ["", "| family | training steps | loss first -> last | seconds |", "|---|---:|---|---:|"]
    for r in out["training"]:
        lines.append(f"| {r['family']} | {r['steps']} | {r['first_loss']:.2f} -> {r['last_loss']:.2f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def _names(text: str, known, flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from "
                         f"{', '.join(known)}")
    return names


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog or "python -m moejax.bench.quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--quantizations", default=",".join(QUANTIZATIONS), help="comma-separated weight quantizations")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="layouts of the memory table (simulated CPU devices)")
    p.add_argument("--train-steps", type=int_in(1, 100_000), default=150, help="Adam steps per model (default 150)")
    p.add_argument("--rows", type=int_in(1, 64), default=8, help="prompts of the accuracy table (default 8)")
    p.add_argument("--tokens", type=int_in(2, 256), default=32, help="tokens per prompt (default 32)")
    p.add_argument("--no-kv", action="store_true", help="skip the quantized KV cache rows")
    args = p.parse_args(argv)
    from moejax.mesh import Layout

    try:
        families = _names(args.families, FAMILIES, "--families")
        quantizations = _names(args.quantizations, QUANTIZATIONS, "--quantizations")
        layouts = [str(Layout.parse(x.strip())) for x in args.layouts.split(",") if x.strip()]
        for family in families:
            for layout in layouts:
                Layout.parse(layout).validate(tiny_config(family))
    except ValueError as err:
        p.error(str(err))
    from moejax.devices import request_cpu_devices

    request_cpu_devices(max(Layout.parse(x).size for x in layouts))
    out = run(families, quantizations, layouts, args.train_steps, args.rows, args.tokens,
              () if args.no_kv else KV_DTYPES)
    print(format_tables(out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
