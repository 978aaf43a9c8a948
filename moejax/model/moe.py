"""Mixture-of-Experts FFN: router, dropless expert dispatch strategies, combine, shared expert.

Expert parallelism here is "replicated tokens, sharded experts": every device of an `expert`
group sees the same tokens, computes only the (token, expert) pairs routed to its local experts,
and one all-reduce over the axes splitting `experts` and `ffn` combines the partial outputs (the
same all-reduce finishes the tensor-parallel FFN). No token is ever dropped.

Strategies for the local expert computation (`dispatch`), all exact, selectable by name:

- ``"loop"``: for each local expert, skip it (`lax.switch`) unless a token is routed to it, else
  gather its tokens into the smallest of a few row capacities (powers of two, then all tokens;
  see `row_caps`) and run it on those. Reads each used expert's weights once, in place, and
  does at most twice the routed FLOPs: the fastest on CPU for decode and prefill alike. Each
  expert is its own buffer (see `Expert`): a slice of a stacked [E, D, F] array is copied by
  XLA:CPU before the matmul reads it.
- ``"blocks"``: sort (token, expert) pairs by expert into fixed-size blocks of one expert each
  (block-sparse grouped matmul). The experts are stacked and gathered per block, which copies
  weights: 2x slower than "loop" for a 256-token prefill on CPU. Kept for measurement on GPU.
- ``"ragged"``: sort pairs and call `jax.lax.ragged_dot`. XLA lowers it to a masked dense matmul
  on CPU (E times the FLOPs); kept for measurement on GPU.
- ``"auto"``: "loop" (the measured best on CPU; GPU not yet measured).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig
from moejax.model.layers import declare, local

STRATEGIES = ("auto", "loop", "blocks", "ragged")


class Expert(nnx.Module):
    """One local expert slot of one layer slot: SwiGLU weights, its own buffers.

    Global shape [stages, expert shards, ...]: entry [p, s] is global expert s * El + slot of the
    stage-p layer, so each device holds exactly its (stage, expert shard) entry as a separate array.
    """

    def __init__(self, cfg: ModelConfig, num_stages: int, num_shards: int, dtype):
        S, X, D, F = num_stages, num_shards, cfg.hidden_size, cfg.moe_intermediate_size
        self.wg = declare((S, X, D, F), ("layers", "experts", "embed", "ffn"), dtype)
        self.wu = declare((S, X, D, F), ("layers", "experts", "embed", "ffn"), dtype)
        self.wd = declare((S, X, F, D), ("layers", "experts", "ffn", "embed"), dtype)


class MoE(nnx.Module):
    """Router, routed experts (SwiGLU) and optional shared expert of one layer slot."""

    def __init__(self, cfg: ModelConfig, num_stages: int, num_expert_shards: int, dtype):
        S, D, E = num_stages, cfg.hidden_size, cfg.num_experts
        self.cfg = cfg
        self.router = declare((S, D, E), ("layers", "embed", "experts_all"), dtype)
        self.experts = nnx.List([Expert(cfg, S, num_expert_shards, dtype)
                                 for _ in range(E // num_expert_shards)])
        if cfg.shared_expert_intermediate_size:
            Fs = cfg.shared_expert_intermediate_size
            self.shared_wg = declare((S, D, Fs), ("layers", "embed", "ffn"), dtype)
            self.shared_wu = declare((S, D, Fs), ("layers", "embed", "ffn"), dtype)
            self.shared_wd = declare((S, Fs, D), ("layers", "ffn", "embed"), dtype)
        if cfg.shared_expert_gate:
            self.shared_gate = declare((S, D), ("layers", "embed"), dtype)

    def __call__(self, x_BTD, strategy: str = "auto", valid_BT=None):
        """MoE output of this layer, reduced over the expert and tensor axes.

        valid_BT: if given, tokens where it is False (batch padding) are routed to no expert, so
        they cost no expert reads or FLOPs; their output is the shared expert's only (unused).
        """
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        with jax.named_scope("moe/route"):
            weights_MX, experts_MX = route(x_MD, local(self.router), self.cfg.num_experts_per_tok,
                                           self.cfg.norm_topk_prob)
            if valid_BT is not None:
                experts_MX = jnp.where(valid_BT.reshape(B * T, 1), experts_MX, -1)  # -1: no shard's expert
        with jax.named_scope("moe/experts"):
            w = tuple([local(getattr(ex, name), 2) for ex in self.experts] for name in ("wg", "wu", "wd"))
            y_MD = dispatch(x_MD, weights_MX.astype(x_MD.dtype), experts_MX, w, strategy)
        if self.cfg.shared_expert_intermediate_size:
            with jax.named_scope("moe/shared"):
                shared_MD = _swiglu(x_MD, local(self.shared_wg), local(self.shared_wu), local(self.shared_wd))
                if self.cfg.shared_expert_gate:
                    gate_M = jax.nn.sigmoid(x_MD @ local(self.shared_gate))
                    shared_MD = shared_MD * gate_M[:, None]
                # Replicated over `expert`: count it once, on the first expert shard.
                y_MD = y_MD + jnp.where(sharding.axis_index("experts") == 0, shared_MD, 0)
        with jax.named_scope("moe/combine"):
            y_MD = sharding.psum(y_MD, "experts", "ffn")
        return y_MD.reshape(B, T, D)


def route(x_MD, router_DE, k: int, normalize: bool):
    """Softmax-then-top-k routing. Returns (weights [M, X] float32, expert ids [M, X] int32).

    Logits and softmax in float32 (numerics policy); weights renormalised over the k chosen
    experts when `normalize` (Mixtral always, Qwen when norm_topk_prob).
    """
    logits_ME = jnp.einsum("MD,DE->ME", x_MD, router_DE, preferred_element_type=jnp.float32)
    probs_ME = jax.nn.softmax(logits_ME, axis=-1)
    weights_MX, experts_MX = jax.lax.top_k(probs_ME, k)
    if normalize:
        weights_MX = weights_MX / jnp.sum(weights_MX, axis=-1, keepdims=True)
    return weights_MX, experts_MX.astype(jnp.int32)


def dispatch(x_MD, weights_MX, experts_MX, w, strategy: str = "auto"):
    """Sum over the routed local experts of weight * expert(x), for this shard's experts.

    Args:
      x_MD: local tokens. weights_MX / experts_MX: routing (global expert ids).
      w: (wg, wu, wd), each either a sequence of El per-expert arrays ([D, F], [D, F], [F, D]) or
        one stacked [El, ...] array; the local experts are global ids [i * El, (i + 1) * El) on
        expert shard i.
    Returns:
      y_MD, a partial sum (this shard's experts, this shard's FFN slice).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE dispatch strategy {strategy!r}; choose from {STRATEGIES}")
    num_local = len(w[0])
    local_MX = experts_MX - sharding.axis_index("experts") * num_local
    local_MX = jnp.where((local_MX >= 0) & (local_MX < num_local), local_MX, num_local)  # El: not here
    if strategy in ("auto", "loop"):
        per_expert = tuple([a[e] for e in range(num_local)] if hasattr(a, "shape") else a for a in w)
        return _dispatch_loop(x_MD, weights_MX, local_MX, per_expert)
    stacked = tuple(a if hasattr(a, "shape") else jnp.stack(a) for a in w)
    fn = {"blocks": _dispatch_blocks, "ragged": _dispatch_ragged}[strategy]
    return fn(x_MD, weights_MX, local_MX, stacked)


def _swiglu(x_MD, wg_DF, wu_DF, wd_FD):
    h_MF = jax.nn.silu(x_MD @ wg_DF) * (x_MD @ wu_DF)
    return h_MF @ wd_FD


def _dispatch_loop(x_MD, weights_MX, local_MX, w):
    M, El = x_MD.shape[0], len(w[0])
    caps = row_caps(M)
    # Routing bookkeeping for all experts at once (a handful of ops, not a handful per expert).
    onehot_MXE = local_MX[..., None] == jnp.arange(El)
    gate_ME = jnp.sum(jnp.where(onehot_MXE, weights_MX[..., None], 0), axis=1)
    hit_ME = jnp.any(onehot_MXE, axis=1)
    count_E = jnp.sum(hit_ME, axis=0)
    which_E = jnp.where(count_E == 0, 0, 1 + jnp.searchsorted(jnp.array(caps), count_E))
    y_MD = jnp.zeros_like(x_MD)
    for e, w_e in enumerate(zip(*w, strict=True)):
        branches = [lambda y, *w: y] + [partial(_expert_rows, x_MD, gate_ME[:, e], hit_ME[:, e], c) for c in caps]
        y_MD = jax.lax.switch(which_E[e], branches, y_MD, *w_e)
    return y_MD


def row_caps(num_rows: int, max_caps: int = 8) -> list[int]:
    """Row capacities of the "loop" strategy: powers of two below `num_rows`, then `num_rows`.

    An expert runs on the smallest capacity that holds its tokens, so it does at most twice its
    routed FLOPs (decode: 1, 2, 4, ... rows rather than the whole batch). Only the `max_caps`
    largest are kept, which bounds the branches compiled per expert; a large prefill chunk then
    pads an expert with few tokens up to num_rows / 2**(max_caps - 1) rows.
    """
    caps = [1 << i for i in range(num_rows.bit_length()) if 1 << i < num_rows] + [num_rows]
    return caps[-max_caps:]


def _expert_rows(x_MD, gate_M, hit_M, cap, y_MD, wg, wu, wd):
    """y + gate * expert(x) on the (at most `cap`) tokens routed to the expert.

    The expert's weights are operands of the `lax.switch`, so a skipped expert is never read.
    """
    if cap == x_MD.shape[0]:
        return y_MD + _swiglu(x_MD, wg, wu, wd) * gate_M[:, None]
    rows_C = jnp.nonzero(hit_M, size=cap, fill_value=x_MD.shape[0])[0]
    out_CD = _swiglu(x_MD.at[rows_C].get(mode="fill", fill_value=0), wg, wu, wd)
    out_CD = out_CD * gate_M.at[rows_C].get(mode="fill", fill_value=0)[:, None]
    return y_MD.at[rows_C].add(out_CD, mode="drop")


def _sort_pairs(local_MX, num_local: int):
    """Flatten (token, slot) pairs and sort them by local expert; absent experts sort last."""
    M, X = local_MX.shape
    expert_N = local_MX.reshape(-1)
    order_N = jnp.argsort(expert_N, stable=True)
    counts_E = jnp.bincount(expert_N, length=num_local + 1)[:num_local]
    return order_N, expert_N[order_N], order_N // X, counts_E


def _dispatch_blocks(x_MD, weights_MX, local_MX, w, block: int = 32):
    wg, wu, wd = w
    El = wg.shape[0]
    order_N, expert_N, token_N, counts_E = _sort_pairs(local_MX, El)
    N = expert_N.shape[0]
    block = min(block, N)
    num_blocks = -(-N // block) + El  # upper bound: each expert's last block may be partial
    padded_E = -(-counts_E // block) * block
    pend_E = jnp.cumsum(padded_E)
    rank_N = jnp.arange(N) - (jnp.cumsum(counts_E) - counts_E)[jnp.minimum(expert_N, El - 1)]
    dest_N = jnp.where(expert_N < El, (pend_E - padded_E)[jnp.minimum(expert_N, El - 1)] + rank_N,
                       num_blocks * block)
    buf_RD = jnp.zeros((num_blocks * block, x_MD.shape[1]), x_MD.dtype)
    buf_RD = buf_RD.at[dest_N].set(x_MD[token_N], mode="drop")
    block_expert = jnp.minimum(jnp.searchsorted(pend_E, jnp.arange(num_blocks) * block, side="right"), El - 1)
    xb = buf_RD.reshape(num_blocks, block, -1)
    h = jax.nn.silu(jnp.einsum("bgD,bDF->bgF", xb, wg[block_expert]))
    h = h * jnp.einsum("bgD,bDF->bgF", xb, wu[block_expert])
    out_RD = jnp.einsum("bgF,bFD->bgD", h, wd[block_expert]).reshape(num_blocks * block, -1)
    pair_ND = out_RD.at[dest_N].get(mode="fill", fill_value=0)
    pair_ND = pair_ND * weights_MX.reshape(-1)[order_N][:, None]
    return jnp.zeros_like(x_MD).at[token_N].add(pair_ND)


def _dispatch_ragged(x_MD, weights_MX, local_MX, w):
    wg, wu, wd = w
    El = wg.shape[0]
    order_N, expert_N, token_N, counts_E = _sort_pairs(local_MX, El)
    # Pairs for other shards' experts ride along in the last group with a zero weight.
    counts_E = counts_E.at[-1].add(expert_N.shape[0] - jnp.sum(counts_E))
    weight_N = jnp.where(expert_N < El, weights_MX.reshape(-1)[order_N], 0)
    xs_ND = x_MD[token_N]
    h = jax.nn.silu(jax.lax.ragged_dot(xs_ND, wg, counts_E)) * jax.lax.ragged_dot(xs_ND, wu, counts_E)
    out_ND = jax.lax.ragged_dot(h, wd, counts_E) * weight_N[:, None].astype(x_MD.dtype)
    return jnp.zeros_like(x_MD).at[token_N].add(out_ND)
