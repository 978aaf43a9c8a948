"""The MoE transformer: embedding, decoder layers stacked per pipeline stage, final norm, unembedding.

`Transformer.run` is the local (per-shard) computation called inside `jax.shard_map` by
`moejax.steps`. Every per-layer weight is ONE array stacked over the layers, [L_pad, ...] with
L_pad = stage * ceil(L / stage), split over `stage`; a stage runs its local layers with one
`lax.scan`, so the compiled program does not grow with the number of layers (nor, with the
stacked experts of `moejax.model.moe`, with the number of experts). Each device's program holds
its own stage's layers once; two schedules move activations between stages with `ppermute`:
`run` takes one batch through every stage in turn (`stage` ticks in one call, the others idle),
`pipeline_tick` is one tick of the pipeline, every stage working on a different microbatch
(`moejax.steps.Steps.pipeline_step`, driven by the engine's microbatch groups).

Padding: a stage with fewer real layers than ceil(L / stage) holds zero-weight layers, each an
exact identity (zero attention and MoE outputs). The vocabulary is padded to a multiple of the
axes that split it (rows of zeros in the embedding, columns of zeros in the unembedding); the
padded logits are masked to -inf here and cut off by `moejax.steps`, so they are never sampled
or returned. FFN widths are padded with zero columns the same way (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import manual
from moejax.config import ModelConfig, ceil_div, round_up
from moejax.mesh import Layout
from moejax.model.attention import Attention
from moejax.model.layers import at_layer, declare, project, rms_norm, rope_tables
from moejax.model.moe import MoE
from moejax.sharding import Parallelism


@dataclass(frozen=True)
class Geometry:
    """How a model is laid out for one Layout: stored (padded) sizes and layers per stage."""

    layers_per_stage: int
    num_kv_heads: int  # kv heads stored (replicated up to `tensor` when fewer)
    stage_layers: tuple[int, ...]  # real layers in each stage
    expert_shards: int  # the `expert` axis size: experts per device = num_experts / expert_shards
    vocab: int  # vocabulary stored: padded to a multiple of `tensor`
    ffn: int  # routed-expert FFN width stored: padded to a multiple of `tensor`
    shared_ffn: int  # shared-expert FFN width stored: padded to a multiple of tensor x expert (0: none)

    @classmethod
    def of(cls, cfg: ModelConfig, layout: Layout) -> Geometry:
        t, e = layout.tensor, layout.expert
        shared = round_up(cfg.shared_expert_intermediate_size, t * e)
        return cls(ceil_div(cfg.num_layers, layout.stage), layout.kv_heads_per_model(cfg),
                   tuple(layout.stage_layers(cfg.num_layers)), e, round_up(cfg.vocab_size, t),
                   round_up(cfg.moe_intermediate_size, t), shared)

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def num_layers(self) -> int:
        """Layers stored: real layers plus the zero padding that evens out the stages."""
        return self.num_stages * self.layers_per_stage

    def slot_of_layer(self) -> list[int]:
        """Stored (padded) layer index of each real layer, in order."""
        slots = []
        for s, n in enumerate(self.stage_layers):
            slots += [s * self.layers_per_stage + j for j in range(n)]
        return slots


class Block(nnx.Module):
    """The decoder layers: norms, attention and MoE, each weight stacked over the stored layers."""

    def __init__(self, cfg: ModelConfig, par: Parallelism, geo: Geometry, dtype):
        L, D = geo.num_layers, cfg.hidden_size
        self.attn_norm = declare((L, D), ("layers", "embed"), dtype)
        self.mlp_norm = declare((L, D), ("layers", "embed"), dtype)
        self.attn = Attention(cfg, par, L, geo.num_kv_heads, dtype)
        self.moe = MoE(cfg, par, L, geo.ffn, geo.shared_ffn, dtype)

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP, eps):
        h_BTD = rms_norm(x_BTD, at_layer(self.attn_norm, layer), eps)
        a_BTD, cache = self.attn(layer, h_BTD, pos_BT, rope, cache, page_table_BP)
        x_BTD = x_BTD + a_BTD
        h_BTD = rms_norm(x_BTD, at_layer(self.mlp_norm, layer), eps)
        return x_BTD + self.moe(layer, h_BTD, valid_BT=pos_BT >= 0), cache


class Transformer(nnx.Module):
    """Weights of the whole model for one layout (stacked layers, padded sizes; see `Geometry`).

    `par` (a `Parallelism`, or a `Layout` for its defaults) is every parallel choice, fixed here: the modules
    keep it as static data and their collectives and shardings follow it.
    """

    def __init__(self, cfg: ModelConfig, par: Parallelism | Layout, dtype=jnp.float32):
        par = par if isinstance(par, Parallelism) else Parallelism(par)
        cfg.check_runtime_support()
        par.layout.validate(cfg)
        self.cfg, self.par = cfg, par
        self.geometry = geo = Geometry.of(cfg, par.layout)
        D, V = cfg.hidden_size, geo.vocab
        self.embed = declare((V, D), ("vocab", "embed"), dtype)
        if not cfg.tie_word_embeddings:
            self.unembed = declare((D, V), ("embed", "vocab"), dtype)
        self.final_norm = declare((D,), ("embed",), dtype)
        self.layers = Block(cfg, par, geo, dtype)

    # ---- local computation (inside shard_map) -------------------------------------------------

    def run(self, tokens_BT, pos_BT, cache, page_table_BP, *, logits_index_B=None):
        """Logits for new tokens, writing their KV into `cache`: the whole batch through every stage.

        With several stages this is the sequential schedule: `stage` ticks, at tick t stage t runs
        its layers (the others wait) and passes the activations on; `pipeline_tick` is the
        pipelined one. Either way each device's program holds its own stage's layers once.

        Args:
          tokens_BT: token ids (local batch). pos_BT: their positions; < 0 marks padding.
          cache: None (no cache: attend within tokens_BT) or a (k, v) pair of page pools, local
            shards [L_local, P, page_size, K, H].
          page_table_BP: [B, pages per sequence] local page ids.
          logits_index_B: if given, only the logits at tokens_BT[b, logits_index_B[b]] are made.
        Returns:
          (logits [B, T, V_local] or [B, V_local] (padded vocabulary columns are -inf), updated cache).
        """
        par = self.par
        x_BTD = self._embed(tokens_BT)
        stage = partial(self.run_stage, pos_BT=pos_BT, page_table_BP=page_table_BP)
        S = self.geometry.num_stages
        if S == 1:
            x_BTD, cache = stage(x_BTD, cache)
        else:
            me = par.axis_index("layers")
            to_next = partial(_to_next_stage, par, num_stages=S)

            def tick(t, carry):
                x_BTD, cache = jax.lax.cond(me == t, stage, lambda x, c: (x, c), *carry)
                x_BTD = jax.lax.cond(t < S - 1, to_next, lambda x: x, x_BTD)
                return x_BTD, cache

            # The activations differ per stage from the first tick on (each stage's own layers).
            x_BTD, cache = jax.lax.fori_loop(0, S, tick, (par.vary(x_BTD, "layers"), cache))
            x_BTD = par.psum(jnp.where(me == S - 1, x_BTD, 0), "layers")  # the last stage's output, to all
        return self.head(x_BTD, logits_index_B), cache

    def pipeline_tick(self, tokens_BT, pos_BT, x_BTD, cache, page_table_BP, logits_index_B, active):
        """One tick of the pipelined schedule: every stage works on its own microbatch at once.

        Stage 0 embeds `tokens_BT` (its microbatch's new tokens); every other stage takes `x_BTD`,
        the activations stage s - 1 sent it last tick. A stage whose microbatch is empty
        (`active` false, the same on all of the stage's devices) skips its layers. The last stage
        makes the logits; every stage's output goes to the next stage with one `ppermute`.

        Args:
          tokens_BT, pos_BT, page_table_BP, logits_index_B: this stage's microbatch (local rows).
          x_BTD: activations received from the previous stage (ignored on stage 0).
          cache: the stage's (k, v) page pools.
          active: scalar bool, this stage has work.
        Returns:
          (logits [B, V_local] of the last stage's microbatch, all-reduced over `stage` so every
          device holds them; the activations this stage sends, as received by the next one
          (stage 0 receives zeros); the updated cache).
        """
        S, par = self.geometry.num_stages, self.par
        me = par.axis_index("layers")
        x_BTD = jax.lax.cond(me == 0, lambda: par.vary(self._embed(tokens_BT), "layers"), lambda: x_BTD)
        x_BTD = jnp.where((pos_BT >= 0)[..., None], x_BTD, 0)  # padding rows: stale activations never enter
        stage = partial(self.run_stage, pos_BT=pos_BT, page_table_BP=page_table_BP)
        x_BTD, cache = jax.lax.cond(active, stage, lambda x, c: (x, c), x_BTD, cache)
        table = self.embed[...] if self.cfg.tie_word_embeddings else self.unembed[...]
        V_local = table.shape[0] if self.cfg.tie_word_embeddings else table.shape[1]
        no_logits = lambda x: manual.varying_like(jnp.zeros((x.shape[0], V_local), x.dtype), x, table)  # noqa: E731
        logits_BV = jax.lax.cond(active & (me == S - 1), lambda x: self.head(x, logits_index_B), no_logits, x_BTD)
        logits_BV = par.psum(jnp.where(me == S - 1, logits_BV, 0), "layers")
        return logits_BV, _to_next_stage(par, x_BTD, S), cache

    def run_stage(self, x_BTD, cache, *, pos_BT, page_table_BP):
        """This device's stage: its local layers, one `lax.scan` over the stacked weights."""
        cfg = self.cfg
        rope = rope_tables(pos_BT, cfg.head_dim, cfg.rope_theta)

        def layer(carry, i):
            x_BTD, cache = carry
            return self.layers(i, x_BTD, pos_BT, rope, cache, page_table_BP, cfg.rms_norm_eps), None

        (x_BTD, cache), _ = jax.lax.scan(layer, (x_BTD, cache), jnp.arange(self.geometry.layers_per_stage))
        return x_BTD, cache

    def head(self, x_BTD, logits_index_B=None):
        """Final norm and unembedding (of the tokens at `logits_index_B` only, when given)."""
        x_BTD = rms_norm(x_BTD, self.final_norm[...], self.cfg.rms_norm_eps)
        if logits_index_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_index_B[:, None, None], axis=1)[:, 0]
        return self._unembed(x_BTD)

    def _embed(self, tokens_BT):
        with jax.named_scope("embed"):
            table_VD = self.embed[...]
            local_BT = tokens_BT - self.par.axis_index("vocab") * table_VD.shape[0]
            here_BT = (local_BT >= 0) & (local_BT < table_VD.shape[0])
            x_BTD = jnp.where(here_BT[..., None], table_VD[jnp.where(here_BT, local_BT, 0)], 0)
            return self.par.psum(x_BTD, "vocab")

    def _unembed(self, x_D):
        with jax.named_scope("unembed"):
            if self.cfg.tie_word_embeddings:
                logits_V = jnp.einsum("...D,VD->...V", x_D, self.embed[...])
            elif math.prod(x_D.shape[:-1]) == 1:
                # One row: XLA's matrix-vector product streams the [D, V] table about twice as fast as the native
                # kernel (0.54x native at [512, 32000], 2026-12-06, 2-vCPU Zen 5, moejax.native's measurements);
                # from two rows on the native kernel is faster (1.1-1.4x).
                logits_V = x_D @ self.unembed[...]
            else:
                logits_V = project(x_D, self.unembed)
            if self.geometry.vocab == self.cfg.vocab_size:
                return logits_V
            V_local = logits_V.shape[-1]
            column_V = self.par.axis_index("vocab") * V_local + jnp.arange(V_local)
            return jnp.where(column_V < self.cfg.vocab_size, logits_V, -jnp.inf)  # padding: never chosen


def _to_next_stage(par: Parallelism, x, num_stages: int):
    """Stage s's x to stage s + 1 (one `ppermute` over `stage`); stage 0 receives zeros."""
    return par.ppermute(x, "layers", [(s, s + 1) for s in range(num_stages - 1)])
