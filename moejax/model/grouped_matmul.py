"""Grouped matmul for the routed experts as Pallas kernels: the "pallas" MoE dispatch strategy (GPU).

XLA compiles `jax.lax.ragged_dot` for H100 as a dense dot over every group (E times the routed FLOPs,
docs/benchmarks.md), so the grouped GEMM is written here, in Pallas (Triton lowering on GPU; Pallas' interpret
mode runs the same kernels on CPU, which is how the tests check them against the per-expert loop).

Layout (as vLLM's fused-MoE kernels and `_dispatch_blocks`): the (token, expert) pairs are sorted by local expert
into blocks of `block` rows, each block holding one expert's pairs only (an expert's last block is partly empty).
Every kernel instance owns one (row block, column tile): it reads its block's expert id and multiplies the block
by that expert's weight tile, read in place from the stacked [L, El, I, O] weights (the layer and expert are
indices into the operand: no per-layer or per-block copy of any weight). Blocks past the routed pairs hold the
expert id El and are skipped. Work per matmul: at most (this shard's routed pairs + El (block - 1)) rows, not
M x El; the static grid is ceil(A / block) + El blocks of the A = M X pairs (every shard's). `choose_block` keeps
El (block - 1) within 0.3x of A wherever a block of 16 rows allows it (A >= ~50 per local expert): within 1.3x
of the routed pairs without expert parallelism; with EP shards that each receive only their pairs, A counts the
other shards' pairs too, so the bound is looser (up to 1 + 0.3 EP times this shard's pairs).

Two kernels per layer: gate and up fused (x read once, silu(x wg) * (x wu) written as h), then down (h wd).
Accumulation in float32; outputs in the activations' dtype. Gate weights and the scatter back to the tokens stay
in XLA (`moe_swiglu`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moejax import manual

MIN_TILE = 16  # Triton's dot needs every tile dim >= 16


KERNELS = ("gate_up_kernel", "down_kernel")  # the pallas_call names (the compiled program's op names carry them)


def call_flops(x_shape, out_shape, num_weights: int) -> float:
    """FLOPs of one kernel call over its whole static grid: x [R, I] times `num_weights` [I, O] tiles per block."""
    (R, I), (_, O) = x_shape, out_shape
    return 2.0 * R * I * O * num_weights


def _tile(n: int, most: int) -> int:
    """Largest power of two <= `most` dividing n."""
    t = most
    while n % t:
        t //= 2
    return t


def supported(d: int, f: int) -> bool:
    """Whether widths D (model) and F (local expert FFN) tile for the GPU kernels (multiples of 16)."""
    return _tile(d, 64) >= MIN_TILE and _tile(f, 64) >= MIN_TILE


def choose_block(pairs: int, num_local: int) -> int:
    """Rows per block: the largest power of two in [16, 64] with El (block - 1) padding rows within 0.3x of
    `pairs` (all M X (token, slot) pairs, every shard's; 16 when none does: Triton's smallest dot tile). Larger
    blocks reuse each weight tile over more rows. The executed work is this shard's routed pairs + El (block - 1)
    rows (blocks past the routed pairs are skipped at run time); the static grid, ceil(pairs / block) + El blocks,
    is what the compiled program counts."""
    block = 64
    while block > MIN_TILE and pairs + num_local * (block - 1) > 1.3 * pairs:
        block //= 2
    return block


def block_layout(local_MX, num_local: int, block: int):
    """Sort (token, slot) pairs by local expert into blocks of `block` rows, one expert per block.

    Args:
      local_MX: local expert id per (token, slot); ids outside [0, num_local) are not here.
    Returns:
      (dest_A: each pair's row in the block buffer (out of range: not here), token_A, order_A (pairs in
      expert order, as flat (token, slot) indices), block_expert (El for a block past the routed pairs)).
      Static sizes: A = M X pairs; min(A, ceil(A / block) + El) blocks (each used block holds >= 1 pair).
    """
    M, X = local_MX.shape
    A = M * X
    expert_A = local_MX.reshape(-1)
    expert_A = jnp.where((expert_A >= 0) & (expert_A < num_local), expert_A, num_local)
    order_A = jnp.argsort(expert_A, stable=True)
    expert_A = expert_A[order_A]
    counts_E = jnp.bincount(expert_A, length=num_local + 1)[:num_local]
    num_blocks = min(A, -(-A // block) + num_local)
    padded_E = -(-counts_E // block) * block
    end_E = jnp.cumsum(padded_E)
    here_A = expert_A < num_local
    clipped_A = jnp.minimum(expert_A, num_local - 1)
    rank_A = jnp.arange(A) - (jnp.cumsum(counts_E) - counts_E)[clipped_A]
    dest_A = jnp.where(here_A, (end_E - padded_E)[clipped_A] + rank_A, num_blocks * block)
    block_expert = jnp.searchsorted(end_E, jnp.arange(num_blocks) * block, side="right").astype(jnp.int32)
    return dest_A, order_A // X, order_A, block_expert  # searchsorted gives El past the last used block


def _kernel(index_ref, expert_ref, x_ref, *refs, bk: int, num_k: int, num_local: int, epilogue):
    """One (row block, column tile): the block times each weight's tile of its expert, then `epilogue` of the
    float32 products; zeros for a block past the routed pairs (expert id El)."""
    *w_refs, o_ref = refs
    layer, e = index_ref[0], expert_ref[0]
    bm, bn = o_ref.shape
    cols = pl.ds(pl.program_id(1) * bn, bn)

    @pl.when(e < num_local)
    def _():
        def body(k, accs):
            x = x_ref[:, pl.ds(k * bk, bk)]
            return tuple(acc + jnp.dot(x, w[layer, e, pl.ds(k * bk, bk), cols], preferred_element_type=jnp.float32)
                         for acc, w in zip(accs, w_refs, strict=True))

        accs = jax.lax.fori_loop(0, num_k, body, tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs))
        o_ref[...] = epilogue(*accs).astype(o_ref.dtype)

    @pl.when(e >= num_local)
    def _():
        o_ref[...] = jnp.zeros((bm, bn), o_ref.dtype)


def _swiglu(g, u):
    return jax.nn.sigmoid(g) * g * u


_EPILOGUES = {"gate_up_kernel": _swiglu, "down_kernel": lambda acc: acc}  # the two calls, by name (KERNELS)


def _grouped(name: str, x_RI, weights, layer, block_expert, block: int, interpret: bool):
    """Kernel call `name` (of KERNELS) over (row block, column tile): x [R, I] (R = blocks x block) times the
    blocks' experts of each weight, then its epilogue."""
    R, I = x_RI.shape
    L, El, _, O = weights[0].shape
    bk, bn = _tile(I, 64), _tile(O, 128 if I <= 2048 else 64)
    grid = (R // block, O // bn)
    whole = pl.BlockSpec((L, El, I, O), lambda b, j: (0, 0, 0, 0))  # read in place by (layer, expert) index
    call = pl.pallas_call(
        functools.partial(_kernel, bk=bk, num_k=I // bk, num_local=El, epilogue=_EPILOGUES[name]),
        grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda b, j: (0,)), pl.BlockSpec((1,), lambda b, j: (b,)),
                  pl.BlockSpec((block, I), lambda b, j: (b, 0))] + [whole] * len(weights),
        out_specs=pl.BlockSpec((block, bn), lambda b, j: (b, j)),
        out_shape=manual.result((R, O), x_RI.dtype, x_RI, block_expert, *weights),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),  # Triton, not Mosaic GPU: any sm_80+
        # At most this much work: every block computed (used blocks: at most pairs + El (block - 1) rows).
        cost_estimate=pl.CostEstimate(flops=int(call_flops((R, I), (R, O), len(weights))), transcendentals=R * O * (
            name == "gate_up_kernel"), bytes_accessed=(R * I + R * O) * x_RI.dtype.itemsize),
        name=name,
    )
    return manual.call_kernel(call, jnp.asarray(layer, jnp.int32).reshape(1), block_expert, x_RI, *weights)


def moe_swiglu(x_MD, weights_MX, local_MX, w, layer, interpret: bool = False, block: int | None = None):
    """Sum over the routed local experts of weight * SwiGLU_e(x): the "pallas" dispatch strategy.

    Args:
      x_MD: tokens. weights_MX: gate weights. local_MX: local expert ids (outside [0, El): not here).
      w: (wg [L, El, D, F], wu [L, El, D, F], wd [L, El, F, D]) stacked local weights. layer: local layer index
        (may be traced). interpret: run the kernels in Pallas' interpret mode (CPU). block: rows per block
        (default `choose_block`).
    Returns:
      y_MD in x's dtype: this shard's partial sum (its experts, its FFN slice).
    """
    wg, wu, wd = w
    M, X = local_MX.shape
    El = wg.shape[1]
    block = block or choose_block(M * X, El)
    dest_A, token_A, order_A, block_expert = block_layout(local_MX, El, block)
    R = block_expert.shape[0] * block
    with jax.named_scope("moe/dispatch"):
        x_RD = jnp.zeros((R, x_MD.shape[1]), x_MD.dtype).at[dest_A].set(x_MD[token_A], mode="drop")
    with jax.named_scope("moe/experts"):
        h_RF = _grouped("gate_up_kernel", x_RD, (wg, wu), layer, block_expert, block, interpret)
        out_RD = _grouped("down_kernel", h_RF, (wd,), layer, block_expert, block, interpret)
    with jax.named_scope("moe/combine"):
        gate_A = weights_MX.reshape(-1)[order_A].astype(x_MD.dtype)
        pair_AD = out_RD.at[dest_A].get(mode="fill", fill_value=0) * gate_A[:, None]
        return jnp.zeros_like(x_MD).at[token_A].add(pair_AD)
