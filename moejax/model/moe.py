"""Mixture-of-Experts FFN: router, dropless expert dispatch strategies, combine, shared expert.

Expert parallelism runs in one of two expert modes (`moejax.sharding.Parallelism`, one rules table each):

- "dp_attention": the devices of an expert group hold different tokens. Each token is sent once to every
  shard that holds one of its experts (`exchange`: an all-to-all of fixed capacity), with its local
  expert ids and gate weights; the shard runs them and returns one gate-weighted row by a second
  all-to-all; the rows are summed at the token's home, and an all-reduce over `tensor` finishes the
  tensor-parallel FFN. Nothing is ever dropped: the largest number of units any device sends to any
  shard (a max over the expert group) picks the smallest of four row capacities that holds it
  (`row_caps(M, 4)`: the largest powers of two below the M local tokens, then M; `lax.switch`). The
  buffers are within 2x of that need when it exceeds the smallest capacity (M/8 to M/4); below it they
  are that smallest capacity (M = 1024 tokens: 128 rows per pair of devices for a need of 3).
- "replicated_attention": every device of an expert group sees the same tokens, computes only the pairs
  routed to its local experts, and one all-reduce over the axes splitting `experts` and `ffn`
  combines the partial outputs (and finishes the shared expert, split over tensor x expert).

No token is ever dropped in either mode.

Routed experts are stacked: each weight is [L, E, D, F] (layers over `stage`, experts over
`expert`, F over `tensor`), so the compiled program does not grow with the number of experts or
layers. Strategies for the local expert computation (`dispatch`), all exact, side by side:

- ``"loop"``: a `lax.fori_loop` over the experts that received tokens (a traced trip count: an
  expert nobody routed to costs nothing). Pairs are sorted by expert; each iteration slices one
  expert's weights (`w[layer, e]`) and runs it on the smallest of a few row capacities that holds
  its tokens (`row_caps`, a `lax.switch`). Reads only routed experts; an expert's FLOPs are within 2x of its
  routed rows when it has more than the smallest capacity (M/128 to M/64 of M local tokens, at least 1: every
  expert at decode sizes), else that capacity (M = 4096: 32 rows for a single token).
- ``"gather"``: one row per (token, expert) pair with that pair's expert weights gathered: the
  simplest form for a handful of pairs (decode at batch 1); it copies k experts' weights per token.
- ``"blocks"``: sort pairs into fixed-size blocks of one expert each (block-sparse grouped matmul);
  weights gathered per block. Kept for measurement on GPU.
- ``"ragged"``: sort pairs and call `jax.lax.ragged_dot`. XLA lowers it to a masked dense matmul
  on CPU and, with jaxlib 0.10.2, on H100 too (E times the FLOPs, docs/benchmarks.md). Kept for comparison.
- ``"pallas"``: the grouped matmul as Pallas kernels (`moejax.model.grouped_matmul`): pairs sorted into
  blocks of one expert, each block times its expert's weights read in place; at most pairs + El (block - 1)
  rows of work. Triton kernels on GPU; Pallas' interpret mode elsewhere (exact, slow: for tests).
- ``"native"``: one call per layer to `moejax.native.moe_swiglu` (CPU, float32 or bfloat16): every routed
  expert on exactly its rows, its weights read in place, on XLA's intra-op threads; a row's result
  does not depend on the other rows. Needs the native kernels (built by the package's install). Experts
  quantized to int8 (`moejax.quant`, one scale per output channel) run it too, the int8 weights read in place
  (`_dispatch_native_int8`); int4 and fp8 experts run "loop" (each routed expert's slice dequantized by XLA).
- ``"auto"``: chosen per backend, dtype and token count by `choose_strategy` (one place).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import manual, native, quant
from moejax.config import ModelConfig
from moejax.model import fp8_matmul, grouped_matmul
from moejax.model.ffn import SILU, activation_of, glu, swiglu
from moejax.model.layers import at_layer, declare, declare_weight
from moejax.model.router import route
from moejax.sharding import MOE_STRATEGIES, Parallelism

STRATEGIES = MOE_STRATEGIES  # one list, beside the other parallel choices (`moejax.sharding`)


class MoE(nnx.Module):
    """Router, routed experts (SwiGLU, stacked) and optional shared expert of a stack's layers.

    Args:
      num_layers: layers stored (the stage-padded count). ffn / shared_ffn: the FFN widths stored,
        padded with zero columns to a multiple of the axes that split them (exact: a zero column
        adds silu(0) * 0 = 0; with gpt-oss's biases the padded columns' biases are zero too: glu(0, 0) = 0).
    """

    def __init__(self, cfg: ModelConfig, par: Parallelism, num_layers: int, ffn: int, shared_ffn: int, dtype,
                 scheme: quant.Scheme | None = None):
        L, D, E, F = num_layers, cfg.hidden_size, cfg.num_experts, ffn
        weight = partial(declare_weight, sch=scheme)
        self.cfg, self.par = cfg, par
        self.router = declare((L, D, E), ("layers", "embed", "experts_all"), dtype)
        if cfg.router_bias:
            self.router_bias = declare((L, E), ("layers", "experts_all"), dtype)
        if cfg.router == "sigmoid":  # for choosing only (a load-balancing buffer); float32 as published
            self.score_bias = declare((L, E), ("layers", "experts_all"), jnp.float32)
        self.wg = weight((L, E, D, F), ("layers", "experts", "embed", "ffn"), dtype, (2,))
        self.wu = weight((L, E, D, F), ("layers", "experts", "embed", "ffn"), dtype, (2,))
        self.wd = weight((L, E, F, D), ("layers", "experts", "ffn", "embed"), dtype, (2,), shards={2: par.size("ffn")})
        if cfg.expert_bias:
            self.bg = declare((L, E, F), ("layers", "experts", "ffn"), dtype)
            self.bu = declare((L, E, F), ("layers", "experts", "ffn"), dtype)
            self.bd = declare((L, E, D), ("layers", "experts", "embed"), dtype)
        if shared_ffn:
            self.shared_wg = weight((L, D, shared_ffn), ("layers", "embed", "shared_ffn"), dtype, (1,))
            self.shared_wu = weight((L, D, shared_ffn), ("layers", "embed", "shared_ffn"), dtype, (1,))
            self.shared_wd = weight((L, shared_ffn, D), ("layers", "shared_ffn", "embed"), dtype, (1,),
                                    shards={1: par.size("shared_ffn")})
        if cfg.shared_expert_gate:
            self.shared_gate = declare((L, D), ("layers", "embed"), dtype)

    def __call__(self, layer, x_BTD, valid_BT=None):
        """MoE output of local layer `layer`, reduced over the expert and tensor axes.

        valid_BT: if given, tokens where it is False (batch padding) are routed to no expert, so
        they cost no expert reads or FLOPs; their output is the shared expert's only (unused).
        """
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        par, cfg = self.par, self.cfg
        with jax.named_scope("moe/route"):
            weights_MX, experts_MX = route(
                cfg, x_MD, at_layer(self.router, layer), at_layer(self.router_bias, layer) if cfg.router_bias else None,
                at_layer(self.score_bias, layer) if cfg.router == "sigmoid" else None)
            if valid_BT is not None:
                experts_MX = jnp.where(valid_BT.reshape(B * T, 1), experts_MX, -1)  # -1: no shard's expert
        # The block's collectives are chosen once, in `Parallelism` (gather, exchange, scatter, reduce).
        with jax.named_scope("moe/gather"):
            xg_MD, wg_MX, eg_MX = (par.gather_tokens(a) for a in (x_MD, weights_MX, experts_MX))
        with jax.named_scope("moe/experts"):
            w = tuple(_expert_weight(a) for a in (self.wg, self.wu, self.wd))
            if cfg.expert_bias:
                # The down bias is added once per (token, expert), not once per tensor shard of the expert's width.
                first = par.axis_index("ffn") == 0
                w += (self.bg[...], self.bu[...], jnp.where(first, self.bd[...], 0).astype(self.bd.dtype))
            wg_MX = wg_MX.astype(x_MD.dtype)
            act = activation_of(cfg)
            if par.exchange_axes:
                y_MD = exchange(xg_MD, wg_MX, eg_MX, w, layer, par, cfg.num_experts, act)
            else:
                y_MD = dispatch(xg_MD, wg_MX, eg_MX, w, par, layer=layer, act=act)
            y_MD = par.scatter_tokens(y_MD)
        if cfg.shared_expert_intermediate_size:
            with jax.named_scope("moe/shared"):
                # This device's slice of the shared FFN width (split over attention's tensor axes, and over expert
                # in "replicated_attention" mode): a partial sum the closing all-reduce completes; computed once.
                shared_MD = swiglu(x_MD, *(fp8_matmul.at_layer(w, layer) for w in (self.shared_wg, self.shared_wu,
                                                                                    self.shared_wd)))
                if cfg.shared_expert_gate:
                    gate_M = jax.nn.sigmoid(x_MD @ at_layer(self.shared_gate, layer))
                    shared_MD = shared_MD * gate_M[:, None]
                y_MD = y_MD + shared_MD
        with jax.named_scope("moe/combine"):
            y_MD = par.reduce_moe(y_MD)
        return y_MD.reshape(B, T, D)


def choose_strategy(strategy: str, num_tokens: int, backend: str | None = None, native_ok: bool = False,
                    pallas_ok: bool = False) -> str:
    """The dispatch strategy to run for `num_tokens` local tokens: the one place "auto" is decided.

    CPU (measured, docs/benchmarks.md): "native" wherever it runs (`native_ok`: kernels built and on, f32 or bf16):
    faster than "loop" at decode batch 1-64 and prefill 64-4096 tokens (docs/benchmarks.md, 2026-12-06); else
    "loop", which reads only routed experts in place of a stacked copy (its FLOPs: `row_caps`). GPU: "pallas" where
    its tiles fit the widths (`pallas_ok`: D and the local F multiples of 16), the grouped GEMM, reading each routed
    expert's weights in place, compiled for H100 at 1.25x the routed FLOPs at a 2048-token DP1 chunk and 1.5x at 512
    tokens (static grid; more behind the dp_attention exchange's worst-case capacity; docs/benchmarks.md,
    2026-12-06); else "loop". Neither is timed on a GPU yet (`moejax bench gpu --moe-strategies auto,loop` does);
    "ragged" is no grouped GEMM there (XLA compiles `ragged_dot` for H100 as a dense dot over every group,
    docs/benchmarks.md).
    `backend` is the platform of the mesh the program is traced for (`native.platform`), not the process's.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE dispatch strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy != "auto":
        return strategy
    del num_tokens  # no token-count dependence measured so far; the signature is where it goes
    if backend == "cpu":
        return "native" if native_ok else "loop"
    return "pallas" if backend == "gpu" and pallas_ok else "loop"


def _expert_weight(param):
    """A stacked expert weight for the dispatch: the array, or a `qwix.QArray` (sliced per expert, dequantized
    there: `quant.dense`)."""
    return param.qarray() if isinstance(param, quant.Quantized) else param[...]


def _strategy_fn(strategy: str, x_MD, w, act: tuple = SILU):
    quantized = any(isinstance(a, quant.qwix.QArray) for a in w)
    if (quantized and act == SILU and len(w) == 3 and strategy in ("auto", "native")
            and native.platform(x_MD) == "cpu" and native.runs_int8(x_MD, *w)):
        return _dispatch_native_int8  # int8 experts (per output channel) on the native kernel, read in place
    if act != SILU or len(w) > 3 or quantized:  # gpt-oss: expert biases, clamped SwiGLU; quantized experts
        if strategy not in ("auto", "loop", "gather"):
            raise ValueError(f"MoE dispatch {strategy!r} runs float, bias-free SiLU experts only; this model's "
                             f"experts are quantized, have biases or the {act[0]} activation: use dispatch 'auto', "
                             f"'loop' or 'gather'")
        return partial(_STRATEGY_FNS["loop" if strategy == "auto" else strategy], act=act)
    ok = native.runs(x_MD, *w)
    pallas_ok = grouped_matmul.supported(x_MD.shape[1], w[0].shape[-1])
    chosen = choose_strategy(strategy, x_MD.shape[0], native.platform(x_MD), ok, pallas_ok)  # the mesh's platform
    if chosen == "native" and not ok:  # asked for by name (Parallelism.checked saw the backend and the build)
        raise ValueError(f"MoE dispatch 'native' runs float32 or bfloat16 only; this model's activations/weights are "
                         f"{x_MD.dtype}/{w[0].dtype}: use dispatch 'auto' or 'loop'")
    return _STRATEGY_FNS[chosen]


def dispatch(x_MD, weights_MX, experts_MX, w, par: Parallelism, layer=None, act: tuple = SILU):
    """Sum over the routed local experts of weight * expert(x), for this shard's experts.

    Args:
      x_MD: local tokens. weights_MX / experts_MX: routing (global expert ids; -1: none).
      w: (wg, wu, wd) local stacked weights, [El, D, F], [El, D, F], [El, F, D], then optionally the biases
        (bg, bu, bd) [El, F], [El, F], [El, D]; or with a leading local-layers axis [L, El, ...] when `layer` (an
        index, may be traced) is given. The local experts are global ids [i * El, (i + 1) * El) on expert shard i.
      par: the model's parallel choices (the expert shards, the dispatch strategy).
      act: the experts' activation (`moejax.model.ffn.activation_of`).
    Returns:
      y_MD, a partial sum (this shard's experts, this shard's FFN slice).
    """
    if layer is None:
        w, layer = tuple(a[None] for a in w), 0
    num_local = w[0].shape[1]
    local_MX = experts_MX - par.axis_index("experts") * num_local
    local_MX = jnp.where((local_MX >= 0) & (local_MX < num_local), local_MX, num_local)  # El: not here
    return local_dispatch(x_MD, weights_MX, local_MX, w, layer, par.moe_strategy, act)


def local_dispatch(x_MD, weights_MX, local_MX, w, layer, strategy: str = "auto", act: tuple = SILU):
    """`dispatch` on one shard's local expert ids (El or any id outside [0, El): not here); w: [L, El, ...]."""
    return _strategy_fn(strategy, x_MD, w, act)(x_MD, weights_MX, local_MX, w, layer)


def choose_exchange(exchange: str, backend: str | None = None) -> str:
    """The token exchange of the "dp_attention" mode to run: the one place "auto" is decided.

    "all_to_all" (fixed capacity, exact, runs everywhere) until a GPU measurement shows the ragged
    collective faster; XLA:CPU has no ragged-all-to-all at all. `backend`: the mesh's platform, as above.
    """
    del backend
    return "all_to_all" if exchange == "auto" else exchange


def exchange(x_MD, weights_MX, experts_MX, w, layer, par: Parallelism, num_experts: int, act: tuple = SILU):
    """The token exchange over `par.exchange_axes`. Where attention replicated the tokens over some of those axes
    (`par.slice_axes`: a split layout's `tensor_expert`), each device exchanges one slice of them and returns the
    rest as zeros, which the block's closing all-reduce over those axes fills in (`Parallelism.reduce_axes`).
    """
    index, n = par.slice_of()
    if n == 1:
        return _exchange(x_MD, weights_MX, experts_MX, w, layer, par, num_experts, act)
    M = x_MD.shape[0]
    rows = -(-M // n)  # rows per slice; padding rows go to no expert
    pad = rows * n - M
    x, gate, experts = (jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill)
                        for a, fill in ((x_MD, 0), (weights_MX, 0), (experts_MX, -1)))
    part = [jax.lax.dynamic_slice_in_dim(a, index * rows, rows) for a in (x, gate, experts)]
    y_RD = _exchange(*part, w, layer, par, num_experts, act)
    y_MD = jax.lax.dynamic_update_slice_in_dim(manual.varying_like(jnp.zeros_like(x), y_RD), y_RD, index * rows, 0)
    return y_MD[:M]


def _exchange(x_MD, weights_MX, experts_MX, w, layer, par: Parallelism, num_experts: int, act: tuple = SILU):
    """Send each token once to every shard holding one of its experts, compute there, send the weighted sums back,
    add them up at home.

    A token is sent to a shard once however many of its top-k experts live there (the unit of the
    exchange is a (token, shard) pair, as in DeepEP-style dispatch), with the routing of those experts
    (local ids, gate weights) riding along; the receiver runs them and returns one gate-weighted row.

    Args:
      x_MD: this device's tokens. weights_MX / experts_MX: their routing (global ids; -1: none).
      w: (wg, wu, wd) local stacked experts [L, El, ...]. layer: local layer index.
      par: the model's parallel choices (the dispatch strategy run on the received rows, the exchange).
      num_experts: E.
    Returns:
      y_MD, this device's tokens' routed-expert output (partial over the FFN width's axes only).
    """
    M, X = experts_MX.shape
    El = w[0].shape[1]
    EP = num_experts // El
    shard_MX = jnp.where(experts_MX >= 0, experts_MX // El, EP)  # EP: no shard (batch padding)
    to_MJ = jnp.any(shard_MX[:, :, None] == jnp.arange(EP), axis=1)  # token m goes to shard s
    # Units (token, shard), sorted by shard; units not sent sort last.
    order_U = jnp.argsort(jnp.where(to_MJ, jnp.arange(EP), EP).reshape(-1), stable=True)
    token_U, dest_U = order_U // EP, order_U % EP
    count_J = jnp.sum(to_MJ, axis=0)
    sent_U = to_MJ.reshape(-1)[order_U]
    dest_U = jnp.where(sent_U, dest_U, EP)
    rank_U = jnp.arange(M * EP) - (jnp.cumsum(count_J) - count_J)[jnp.minimum(dest_U, EP - 1)]
    mine_UX = shard_MX[token_U] == dest_U[:, None]  # which of the token's experts this unit carries
    local_UX = jnp.where(mine_UX, experts_MX[token_U] % El, El).astype(jnp.int32)  # El: not carried
    gate_UX = jnp.where(mine_UX, weights_MX[token_U], 0)
    units = (dest_U, rank_U, token_U, local_UX, gate_UX)
    run = partial(_compute_received, par.moe_strategy, w, layer, act)
    if choose_exchange(par.exchange, native.platform(x_MD)) == "ragged_all_to_all":
        return _exchange_ragged(par, EP, El, run, x_MD, count_J, *units)
    need = par.pmax(jnp.max(count_J), "experts")  # the same on every device of the exchange
    caps = row_caps(M, max_caps=4)  # a token goes to a shard at most once: M rows is the worst case
    branches = [partial(_exchange_at, par, cap, EP, El, run, x_MD) for cap in caps]
    return jax.lax.switch(jnp.searchsorted(jnp.array(caps), need), branches, *units)


def _compute_received(strategy, w, layer, act, recv_RD, local_RX, gate_RX):
    """Received rows, each with its local experts (El: none) and gate weights: the gate-weighted sum per row."""
    return local_dispatch(recv_RD, gate_RX, local_RX, w, layer, strategy, act)


def _combine_home(x_MD, unit_UD, token_U):
    with jax.named_scope("moe/combine"):
        return jnp.zeros_like(x_MD).at[token_U].add(unit_UD)


def _exchange_at(par, cap, EP, El, run, x_MD, dest_U, rank_U, token_U, local_UX, gate_UX):
    """One all-to-all each way with `cap` rows per (sender, receiver): unit u goes to slot dest * cap + rank."""
    D = x_MD.shape[1]
    slot_U = jnp.where(dest_U < EP, dest_U * cap + rank_U, EP * cap)  # out of range: not sent
    with jax.named_scope("moe/dispatch"):
        send = [jnp.full((EP * cap, *a.shape[1:]), fill, a.dtype).at[slot_U].set(a, mode="drop")
                for a, fill in ((x_MD[token_U], 0), (local_UX, El), (gate_UX, 0))]  # El: empty slot
        recv_RD, recv_RX, gate_RX = (par.all_to_all(a.reshape(EP, cap, *a.shape[1:]), "experts")
                                     .reshape(EP * cap, *a.shape[1:]) for a in send)
    out_RD = run(recv_RD, recv_RX, gate_RX)
    back_RD = par.all_to_all(out_RD.reshape(EP, cap, D), "experts").reshape(EP * cap, D)
    return _combine_home(x_MD, back_RD.at[slot_U].get(mode="fill", fill_value=0), token_U)


def _exchange_ragged(par, EP, El, run, x_MD, count_J, dest_U, rank_U, token_U, local_UX, gate_UX):
    """Both ways with `ragged_all_to_all`: only the units move (sizes from an all-gather of the counts).

    Units are sorted by destination shard; the rows for shard j start at the prefix sum of the counts.
    """
    del rank_U
    M, D = x_MD.shape
    U = dest_U.shape[0]
    counts_JJ = par.all_gather(count_J, "experts")  # [sender, receiver] units, the same everywhere
    me = par.axis_index("experts")
    recv_J = counts_JJ[:, me]  # what each sender sends me
    send_off_J = jnp.cumsum(count_J) - count_J
    land_off_J = (jnp.cumsum(counts_JJ, axis=0) - counts_JJ)[me]  # where my rows land at each receiver
    R = EP * M  # worst case received: every sender's every token
    with jax.named_scope("moe/dispatch"):
        recv_RD, recv_RX, gate_RX = (
            par.ragged_all_to_all(a, jnp.full((R, *a.shape[1:]), fill, a.dtype), send_off_J, count_J,
                                       land_off_J, recv_J, "experts")
            for a, fill in ((x_MD[token_U], 0), (local_UX, El), (gate_UX, 0)))  # El: empty slot
    out_RD = run(recv_RD, recv_RX, gate_RX)
    back_off_J = jnp.cumsum(recv_J) - recv_J  # the rows I computed for each sender, in my buffer
    home_off_J = (jnp.cumsum(counts_JJ, axis=1) - counts_JJ)[:, me]  # where they came from in each sender
    back_UD = par.ragged_all_to_all(out_RD, jnp.zeros((U, D), out_RD.dtype), back_off_J, recv_J, home_off_J,
                                         count_J, "experts")
    return _combine_home(x_MD, jnp.where((dest_U < EP)[:, None], back_UD, 0), token_U)


def _sort_pairs(local_MX, num_local: int):
    """Flatten (token, slot) pairs and sort them by local expert; absent experts sort last.

    Returns (pair order [A], expert of each sorted pair [A], token of each sorted pair [A],
    pairs per local expert [El]).
    """
    M, X = local_MX.shape
    expert_A = local_MX.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    counts_E = jnp.bincount(expert_A, length=num_local + 1)[:num_local]
    return order_A, expert_A[order_A], order_A // X, counts_E


def _dispatch_loop(x_MD, weights_MX, local_MX, w, layer, act: tuple = SILU):
    M, El = x_MD.shape[0], w[0].shape[1]
    caps = row_caps(M)
    order_A, _, token_A, count_E = _sort_pairs(local_MX, El)
    start_E = jnp.cumsum(count_E) - count_E
    # Sorted pair lists padded by M entries, so any expert's window of `cap` pairs is in range;
    # padding and other experts' pairs in a window are masked by the expert's count.
    token_A = jnp.concatenate([token_A, jnp.full((M,), M, token_A.dtype)])
    gate_A = jnp.concatenate([weights_MX.reshape(-1)[order_A], jnp.zeros((M,), weights_MX.dtype)])
    used_U = jnp.nonzero(count_E > 0, size=El, fill_value=0)[0]  # routed experts first

    def run_expert(u, y_MD):
        e = used_U[u]
        branches = [partial(_expert_rows, x_MD, token_A, gate_A, w, layer, act, cap) for cap in caps]
        which = jnp.searchsorted(jnp.array(caps), count_E[e])
        return jax.lax.switch(which, branches, y_MD, e, start_E[e], count_E[e])

    y_MD = manual.varying_like(jnp.zeros_like(x_MD), x_MD, *jax.tree.leaves(w))  # each shard adds its own rows
    return jax.lax.fori_loop(0, jnp.sum(count_E > 0), run_expert, y_MD)


def row_caps(num_rows: int, max_caps: int = 8) -> list[int]:
    """Row capacities of the "loop" strategy: powers of two below `num_rows`, then `num_rows`.

    An expert runs on the smallest capacity that holds its tokens (decode: 1, 2, 4, ... rows rather
    than the whole batch). Only the `max_caps` largest are kept, which bounds the branches compiled:
    the smallest kept is 2**(k - max_caps + 2) for 2**k < num_rows <= 2**(k + 1) (between
    num_rows / 2**(max_caps - 1) and twice that), so an expert with more rows than that runs on at most
    twice its rows, and one with fewer on that many (num_rows 1024, max_caps 8: 8 rows).
    """
    caps = [1 << i for i in range(num_rows.bit_length()) if 1 << i < num_rows] + [num_rows]
    return caps[-max_caps:]


def _expert_rows(x_MD, token_A, gate_A, w, layer, act, cap, y_MD, e, start, count):
    """y + gate * expert_e(x) on the expert's (at most `cap`) tokens: its pairs start..start+count.

    The expert's weights are sliced here, one expert at a time (a copy of that expert only on
    XLA:CPU), never the layer's whole stack.
    """
    in_R = jnp.arange(cap) < count
    rows_R = jnp.where(in_R, jax.lax.dynamic_slice_in_dim(token_A, start, cap), x_MD.shape[0])
    gate_R = jnp.where(in_R, jax.lax.dynamic_slice_in_dim(gate_A, start, cap), 0)
    x_RD = x_MD.at[rows_R].get(mode="fill", fill_value=0)
    expert = [a[layer, e] for a in w]  # one expert's slice; quantized: swiglu's fp8_matmul.dot takes it
    out_RD = swiglu(x_RD, *expert[:3], expert[3:] or None, act)
    return y_MD.at[rows_R].add(out_RD * gate_R[:, None], mode="drop")


def _dispatch_gather(x_MD, weights_MX, local_MX, w, layer, act: tuple = SILU):
    M, X = local_MX.shape
    El = w[0].shape[1]
    here_A = local_MX.reshape(-1) < El
    expert_A = jnp.where(here_A, local_MX.reshape(-1), 0)
    wg, wu, wd, *biases = (quant.dense(a[layer, expert_A], x_MD.dtype) for a in w)  # [M * X, ...] per pair
    x_AD = jnp.repeat(x_MD, X, axis=0)
    g_AF, u_AF = jnp.einsum("AD,ADF->AF", x_AD, wg), jnp.einsum("AD,ADF->AF", x_AD, wu)
    if biases:
        g_AF, u_AF = g_AF + biases[0], u_AF + biases[1]
    out_AD = jnp.einsum("AF,AFD->AD", glu(g_AF, u_AF, act), wd)
    if biases:
        out_AD = out_AD + biases[2]
    out_AD = out_AD * jnp.where(here_A, weights_MX.reshape(-1), 0)[:, None]
    return jnp.sum(out_AD.reshape(M, X, -1), axis=1)


def _dispatch_blocks(x_MD, weights_MX, local_MX, w, layer, block: int = 32):
    wg, wu, wd = (a[layer] for a in w)
    El = wg.shape[0]
    order_A, expert_A, token_A, counts_E = _sort_pairs(local_MX, El)
    A = expert_A.shape[0]
    block = min(block, A)
    num_blocks = -(-A // block) + El  # upper bound: each expert's last block may be partial
    padded_E = -(-counts_E // block) * block
    pend_E = jnp.cumsum(padded_E)
    rank_A = jnp.arange(A) - (jnp.cumsum(counts_E) - counts_E)[jnp.minimum(expert_A, El - 1)]
    dest_A = jnp.where(expert_A < El, (pend_E - padded_E)[jnp.minimum(expert_A, El - 1)] + rank_A,
                       num_blocks * block)
    buf_RD = jnp.zeros((num_blocks * block, x_MD.shape[1]), x_MD.dtype)
    buf_RD = buf_RD.at[dest_A].set(x_MD[token_A], mode="drop")
    block_expert = jnp.minimum(jnp.searchsorted(pend_E, jnp.arange(num_blocks) * block, side="right"), El - 1)
    xb = buf_RD.reshape(num_blocks, block, -1)
    h = jax.nn.silu(jnp.einsum("bgD,bDF->bgF", xb, wg[block_expert]))
    h = h * jnp.einsum("bgD,bDF->bgF", xb, wu[block_expert])
    out_RD = jnp.einsum("bgF,bFD->bgD", h, wd[block_expert]).reshape(num_blocks * block, -1)
    pair_AD = out_RD.at[dest_A].get(mode="fill", fill_value=0)
    pair_AD = pair_AD * weights_MX.reshape(-1)[order_A][:, None]
    return jnp.zeros_like(x_MD).at[token_A].add(pair_AD)


def _dispatch_ragged(x_MD, weights_MX, local_MX, w, layer):
    wg, wu, wd = (a[layer] for a in w)
    El = wg.shape[0]
    order_A, expert_A, token_A, counts_E = _sort_pairs(local_MX, El)
    # Pairs for other shards' experts ride along in the last group with a zero weight.
    counts_E = counts_E.at[-1].add(expert_A.shape[0] - jnp.sum(counts_E))
    weight_A = jnp.where(expert_A < El, weights_MX.reshape(-1)[order_A], 0)
    xs_AD = x_MD[token_A]
    h = jax.nn.silu(jax.lax.ragged_dot(xs_AD, wg, counts_E)) * jax.lax.ragged_dot(xs_AD, wu, counts_E)
    out_AD = jax.lax.ragged_dot(h, wd, counts_E) * weight_A[:, None].astype(x_MD.dtype)
    return jnp.zeros_like(x_MD).at[token_A].add(out_AD)


def _dispatch_native(x_MD, weights_MX, local_MX, w, layer):
    return native.moe_swiglu(x_MD, weights_MX, local_MX, *w, layer)


def _dispatch_native_int8(x_MD, weights_MX, local_MX, w, layer):
    """"native" on int8 experts (`qwix.QArray`s: values [L, E, ., .] int8, one scale per output channel)."""
    return native.moe_swiglu(x_MD, weights_MX, local_MX, *(a.qvalue for a in w), layer,
                             scales=tuple(a.scale for a in w))


def _dispatch_pallas(x_MD, weights_MX, local_MX, w, layer):
    return grouped_matmul.moe_swiglu(x_MD, weights_MX, local_MX, w, layer, interpret=native.platform(x_MD) != "gpu")


_STRATEGY_FNS = {"native": _dispatch_native, "loop": _dispatch_loop, "gather": _dispatch_gather,
                 "blocks": _dispatch_blocks, "ragged": _dispatch_ragged, "pallas": _dispatch_pallas}
