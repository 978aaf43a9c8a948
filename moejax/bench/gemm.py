"""Few-row matmul roofline on this host: how close XLA's dots get to reading weights at full bandwidth.

    python -m moejax.bench.gemm                       # bench-moe-100m shapes, rows 1,2,4,8,32
    python -m moejax.bench.gemm --rows 1,8 --model tiny-moe
    python -m moejax.bench.gemm --native            # also: whole MoE layers, XLA's dots vs moejax.native

A decode step multiplies a few rows (the batch, or the tokens routed to one expert) by weight
matrices that are read once: at few rows the time should be the weight bytes over the streaming
bandwidth. For each row count and each of the model's decode matmul shapes (an expert's
gate/up [D, F] and down [F, D], the unembedding [D, V]) this times a chain of matmuls over
distinct weight matrices, like a decode step's (so weights come from memory, not cache), and
prints the bandwidth and FLOP rate reached next to the roofline: min(bandwidth, FLOP roof /
arithmetic intensity), where the bandwidth is measured in the same run (as in
`moejax.bench.decode`) and the FLOP roof is the rate of a large square matmul.

This is the measurement behind the decode benchmark's bandwidth-limit figures: when the few-row
dots of the backend run far below the roofline, so does the decode step (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from moejax.args import Parser, int_list, read_model_config, real_in, run_main
from moejax.bench.decode import _timed, measure_bandwidth


def flop_roof(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square float32 matmul (the backend's compute roof in practice)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    best = min(_timed(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def chain_time(rows: int, shape: tuple[int, int], count: int, repeats: int = 7) -> float:
    """Seconds for `count` dependent [rows, K] x [K, N] products over distinct weights (median)."""
    import jax
    import jax.numpy as jnp

    K, N = shape
    rng = np.random.default_rng(1)
    ws = [jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.05) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((rows, K), np.float32))

    @jax.jit
    def chain(x, ws):
        acc = jnp.zeros((), jnp.float32)
        for w in ws:  # each product feeds the next input, as layers do: no reordering, no overlap
            y = x @ w
            acc = acc + y[:, 0].sum()
            x = x + 1e-3 * y[:, :K] if N >= K else x + 1e-3 * jnp.pad(y, ((0, 0), (0, K - N)))
        return acc

    chain(x, ws).block_until_ready()
    return float(np.median([_timed(lambda: chain(x, ws).block_until_ready()) for _ in range(repeats)]))


def moe_chain_time(tokens: int, D: int, F: int, E: int, k: int, layers: int, strategy: str, repeats: int = 7) -> float:
    """Seconds for `layers` dependent MoE layers (E experts of SwiGLU [D, F], top-k routing, distinct
    weights per layer) on `tokens` tokens, run by `moejax.model.moe.dispatch` with `strategy` (median)."""
    import jax
    import jax.numpy as jnp

    from moejax.model import moe

    rng = np.random.default_rng(2)
    w = [jnp.asarray(rng.standard_normal((layers, E, *s), np.float32) * 0.05) for s in ((D, F), (D, F), (F, D))]
    x = jnp.asarray(rng.standard_normal((tokens, D), np.float32))
    experts = jnp.asarray(np.argsort(rng.random((tokens, E)), axis=1)[:, :k], jnp.int32)  # k distinct each
    gates = jnp.full((tokens, k), 1.0 / k, jnp.float32)

    @jax.jit
    def chain(x, *w):
        body = lambda i, x: x + 1e-3 * moe.local_dispatch(x, gates, experts, w, i, strategy)  # noqa: E731
        return jax.lax.fori_loop(0, layers, body, x)

    chain(x, *w).block_until_ready()
    return float(np.median([_timed(lambda: chain(x, *w).block_until_ready()) for _ in range(repeats)]))


def _native_table(cfg, rows_list: list[int], weight_mb: float, bandwidth: float) -> None:
    from moejax import native

    if native.unavailable_reason():
        print(f"native kernel: {native.unavailable_reason()}")
        return
    D, F, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    expert_bytes = 3 * 4 * D * F
    layers = max(1, int(weight_mb * 2**20 // (E * expert_bytes)))
    print(f"\nMoE layer, {E} experts of SwiGLU [{D}, {F}] ({expert_bytes / 1e6:.1f} MB each), top-{k}, {layers}"
          f" layers per chain: XLA ('loop' dispatch: slice + dots) vs moejax.native ('native': one call per layer)")
    print(f"{'rows':>5} {'loop':>10} {'GB/s':>6} {'native':>10} {'GB/s':>6} {'GFLOP/s':>8} {'speed-up':>8}"
          f" {'of bandwidth':>12}")
    for rows in rows_list:
        used = min(E, rows * k)  # experts read per layer (k distinct per token)
        nbytes, flops = used * expert_bytes, 2 * rows * k * 3 * D * F
        t_xla, t_nat = (moe_chain_time(rows, D, F, E, k, layers, s) / layers for s in ("loop", "native"))
        print(f"{rows:>5} {t_xla * 1e6:8.1f}us {nbytes / t_xla / 1e9:6.1f} {t_nat * 1e6:8.1f}us"
              f" {nbytes / t_nat / 1e9:6.1f} {flops / t_nat / 1e9:8.1f} {t_xla / t_nat:7.2f}x"
              f" {nbytes / t_nat / bandwidth:11.0%}", flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog or "python -m moejax.bench.gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench-moe-100m", help="model config (name or YAML) giving D, F, V")
    p.add_argument("--rows", type=int_list(1, 4096), default=[1, 2, 4, 8, 32], help="rows of the activations")
    p.add_argument("--weight-mb", type=real_in(0.001, 1 << 20), default=64.0,
                   help="bytes of distinct weights per chain (above the last-level cache)")
    p.add_argument("--native", action="store_true",
                   help="also time whole MoE layers: XLA's 'loop' dispatch vs the native kernel (moejax.native)")
    args = p.parse_args(argv)
    cfg = read_model_config(args.model)
    import jax

    D, F, V = cfg.hidden_size, cfg.moe_intermediate_size, cfg.vocab_size
    bandwidth = max(measure_bandwidth().values())
    roof = flop_roof()
    print(f"{jax.devices()[0].device_kind}: streaming bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"large-matmul rate {roof / 1e9:.0f} GFLOP/s (float32)")
    print(f"{'shape':>16} {'rows':>4} {'time/dot':>10} {'GB/s':>6} {'GFLOP/s':>8} {'roofline':>9} {'of roofline':>11}")
    for name, shape in (("expert gate/up", (D, F)), ("expert down", (F, D)), ("unembedding", (D, V))):
        nbytes = 4 * shape[0] * shape[1]
        count = max(1, int(args.weight_mb * 2**20 // nbytes))
        for rows in args.rows:
            t = chain_time(rows, shape, count) / count
            flops = 2 * rows * shape[0] * shape[1]
            ideal = max(nbytes / bandwidth, flops / roof)
            print(f"{name:>16} {rows:>4} {t * 1e6:8.1f}us {nbytes / t / 1e9:6.1f} {flops / t / 1e9:8.1f}"
                  f" {ideal * 1e6:7.1f}us {ideal / t:10.0%}", flush=True)
    if args.native:
        _native_table(cfg, args.rows, args.weight_mb, bandwidth)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
