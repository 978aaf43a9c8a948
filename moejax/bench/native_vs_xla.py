"""Each native CPU kernel against its pure-XLA fallback, at bench-moe-100m's decode and prefill sizes.

Every case compiles the same function twice, with the kernels on and off (`MOEJAX_NATIVE`, read at trace time),
asserts which program holds the custom call, then times the two alternately (median of `--reps` each) and prints
XLA time / native time: above 1, the kernel earns its lines there. Shapes are bench-moe-100m's (D 512, F 640,
8 experts top-2, 8 heads / 2 kv heads of 64, vocab 32000), each case chained over 8 layers so the weights come
from memory as in a step:

    python -m moejax.bench.native_vs_xla                      # every kernel at 1, 8 and 32 rows
    python -m moejax.bench.native_vs_xla --kernels moe --rows 1,8,32,256,1024 --reps 41
    python -m moejax.bench.native_vs_xla --dtype bfloat16     # bf16 operands; also times native float32

`--dtype bfloat16` builds every operand in bfloat16 (the route weights stay float32, as the model passes them)
and times a third program: the native kernels on the same operands in float32 ("f32/bf16": above 1, the bf16
kernel is faster than the float32 one).

The ISA variant is the one the process loads (`MOEJAX_NATIVE_ISA`, or the best this CPU runs).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import native
from moejax.args import Parser, int_in, int_list, run_main
from moejax.model import attention, layers, moe

KERNELS = ("moe", "projections", "unembed", "attention", "argmax")
D, F, E, TOP_K, L, V, N, K, H, PAGE = 512, 640, 8, 2, 8, 32000, 8, 2, 64, 16


def _compiled(make, switch: str, args):
    before = os.environ.get(native.ENV)
    os.environ[native.ENV] = switch
    try:
        return jax.jit(make()).lower(*args).compile()
    finally:
        if before is None:
            del os.environ[native.ENV]
        else:
            os.environ[native.ENV] = before


def _time(name: str, make, args, reps: int) -> dict:
    """Native against XLA on `args`; where they are bfloat16, also native on them cast to float32 ("native_f32")."""
    programs = {"native": (_compiled(make, "1", args), args), "xla": (_compiled(make, "0", args), args)}
    assert "moejax_" in programs["native"][0].as_text() and "moejax_" not in programs["xla"][0].as_text(), name
    if any(a.dtype == jnp.bfloat16 for a in args):
        args32 = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args)
        programs["native_f32"] = (_compiled(make, "1", args32), args32)
        assert "moejax_" in programs["native_f32"][0].as_text(), name
    jax.block_until_ready([fn(*a) for fn, a in programs.values()])
    times: dict[str, list[float]] = {side: [] for side in programs}
    for _ in range(reps):
        for side, (fn, a) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times[side].append(time.perf_counter() - start)
    row = {"case": name, **{f"{side}_s": float(np.median(t)) for side, t in times.items()}}
    row["xla_over_native"] = row["xla_s"] / row["native_s"]
    line = (f"{name:<44} native {row['native_s'] * 1e6:9.1f} us  xla {row['xla_s'] * 1e6:9.1f} us  "
            f"xla/native {row['xla_over_native']:6.2f}x")
    if "native_f32_s" in row:
        row["f32_over_native"] = row["native_f32_s"] / row["native_s"]
        line += f"  native f32 {row['native_f32_s'] * 1e6:9.1f} us  f32/bf16 {row['f32_over_native']:5.2f}x"
    print(line, flush=True)
    return row


def _layers_chain(step):
    """`step(i, x, *weights)` over the L layers, as a fresh function of (x, *weights) (a fresh function per
    compile: jit's cache would otherwise hand the XLA side the native trace)."""
    return lambda x, *w: jax.lax.fori_loop(0, L, lambda i, x_: step(i, x_, *w), x)


def _moe_step(gates, experts, i, x, *w):
    return x + 1e-3 * moe.local_dispatch(x, gates, experts, w, i)


def _projections(i, x, wq, wk, wv, wo):
    q, k, v = (layers.project(x, a, i) for a in (wq, wk, wv))
    return x + 1e-3 * layers.project(q + 1e-3 * (k.sum() + v.sum()), wo, i, contract=2)


def _attention_step(table, pos, i, q, k_pool, v_pool):
    return q + 1e-3 * attention.cached_attention(q, (k_pool, v_pool), i, table, pos, None, q.shape[-1] ** -0.5)


def run(kernels=KERNELS, rows=(1, 8, 32), reps: int = 15, seed: int = 0, dtype: str = "float32") -> list[dict]:
    """Time every case with operands in `dtype` ("float32" or "bfloat16"); returns one dict per case (`case`,
    `native_s`, `xla_s`, `xla_over_native`; bfloat16 also `native_f32_s`, `f32_over_native`)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05, dtype)  # noqa: E731
    out = []
    print(f"native ISA variant: {native.isa()}, operands {dtype}", flush=True)
    if "moe" in kernels:
        w = (normal(L, E, D, F), normal(L, E, D, F), normal(L, E, F, D))
        for B in rows:
            x = normal(B, D)
            experts = jnp.asarray(np.argsort(rng.random((B, E)), axis=1)[:, :TOP_K], jnp.int32)
            gates = jnp.full((B, TOP_K), 0.5, jnp.float32)
            step = functools.partial(_moe_step, gates, experts)
            out.append(_time(f"MoE layer x{L}, {B} tokens", functools.partial(_layers_chain, step), (x, *w), reps))
    if "projections" in kernels:
        w = (normal(L, D, N, H), normal(L, D, K, H), normal(L, D, K, H), normal(L, N, H, D))

        for B in rows:
            out.append(_time(f"attention projections x{L}, {B} rows", functools.partial(_layers_chain, _projections),
                             (normal(B, 1, D), *w), reps))
    if "unembed" in kernels:
        table = normal(D, V)
        for B in rows:
            out.append(_time(f"unembedding [{D}, {V}], {B} rows", lambda: lambda x, w: layers.project(x, w),
                             (normal(B, 1, D), table), reps))
    if "attention" in kernels:
        for context in (96, 1024):
            pages = context // PAGE
            for B in rows:
                pools = (normal(L, B * pages, PAGE, K, H), normal(L, B * pages, PAGE, K, H))
                table = jnp.asarray(rng.permutation(B * pages).reshape(B, pages), jnp.int32)
                pos = jnp.asarray(rng.integers(context // 3, context, (B, 1)), jnp.int32)
                step = functools.partial(_attention_step, table, pos)
                out.append(_time(f"paged attention x{L}, context {context}, {B} rows",
                                 functools.partial(_layers_chain, step), (normal(B, 1, N, H), *pools), reps))
    if "argmax" in kernels:
        for B in rows:
            out.append(_time(f"argmax and finite [{B}, {V}]", lambda: lambda x: layers.argmax_and_finite(x),
                             (normal(B, V),), reps))
    return out


def main(argv=None, prog: str | None = None) -> int:
    p = Parser(prog=prog or "python -m moejax.bench.native_vs_xla", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, from {', '.join(KERNELS)}")
    p.add_argument("--rows", type=int_list(1), default=[1, 8, 32], help="rows (tokens) per case")
    p.add_argument("--reps", type=int_in(1), default=15, help="timed calls per side and case (median)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="operand dtype (bfloat16: also times the native kernels on float32 copies)")
    args = p.parse_args(argv)
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    unknown = [k for k in kernels if k not in KERNELS]
    if not kernels or unknown:
        p.error(f"--kernels: expected comma-separated names from {list(KERNELS)}, got {args.kernels!r}")
    if not native.available():
        p.error(f"the native kernels are not available here: {native.unavailable_reason() or 'MOEJAX_NATIVE=0'}")
    run(kernels, tuple(args.rows), args.reps, dtype=args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
