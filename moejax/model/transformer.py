"""The MoE transformer: embedding, decoder layers stacked per pipeline stage, final norm, unembedding.

`Transformer.run` is the local (per-shard) computation called inside `jax.shard_map` by `moejax.steps`.
A model is a sequence of homogeneous layer stacks (`Geometry.stacks`: dense-FFN layers, then MoE layers);
every per-layer weight of a stack is ONE array stacked over its slots, [stage * slots, ...], split over
`stage`; a stage runs each stack's local layers with one `lax.scan`, so the compiled program does not grow
with the number of layers (nor, with the stacked experts of `moejax.model.moe`, with the number of experts).
The attention kind (GQA or MLA, `ATTENTION`) and the router (`moejax.model.router`) are chosen from the
config. Each device's program holds its own stage's layers once; two schedules move activations between
stages with `ppermute`: `run` takes one batch through every stage in turn (`stage` ticks in one call, the
others idle), `pipeline_tick` is one tick of the pipeline, every stage working on a different microbatch
(`moejax.steps.Steps.pipeline_step`, driven by the engine's microbatch groups).

Padding: a stage with fewer real layers of a stack than the stack's slots per stage holds zero weights in the
other slots and skips them (`lax.cond`). The vocabulary is padded to a multiple of the
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
import numpy as np
from flax import nnx

from moejax import manual, quant
from moejax.config import ModelConfig, round_up
from moejax.mesh import Layout
from moejax.model.attention import Attention
from moejax.model.ffn import DenseFFN
from moejax.model.layers import at_layer, declare, project, rms_norm
from moejax.model.mla import MLA
from moejax.model.moe import MoE
from moejax.model.rope import Rope
from moejax.quant import Quantized
from moejax.sharding import Parallelism


@dataclass(frozen=True)
class Stack:
    """One homogeneous run of layers (the same FFN kind): its weights are stacked [S * layers_per_stage, ...]
    over `stage`, each stage scanning its own slots with one `lax.scan`."""

    name: str  # the Transformer attribute holding its weights: "dense_layers" | "layers"
    ffn: str  # "dense" | "moe"
    first_layer: int  # global index of its first layer
    stage_layers: tuple[int, ...]  # real layers of this stack on each stage
    layers_per_stage: int  # slots per stage (the largest stage_layers); the rest are skipped
    cache_offsets: tuple[int, ...]  # per stage: the stack's first layer's index in the stage's cache pools

    def layers_of_stage(self, stage: int) -> range:
        """Global indices of the stack's layers on `stage`, in order."""
        start = self.first_layer + sum(self.stage_layers[:stage])
        return range(start, start + self.stage_layers[stage])

    def slot_of_layer(self) -> dict[int, int]:
        """Global layer index -> stored slot (over all stages) of this stack's weights."""
        return {layer: s * self.layers_per_stage + j for s in range(len(self.stage_layers))
                for j, layer in enumerate(self.layers_of_stage(s))}


@dataclass(frozen=True)
class Geometry:
    """How a model is laid out for one Layout: stored (padded) sizes, its layer stacks and their stage split.

    A model is a sequence of homogeneous stacks (DeepSeek-V3: 3 dense layers, then 58 MoE layers); the layers
    are split over stages as one sequence, so a stage boundary may fall inside a stack or between two. Each stage
    holds `layers_per_stage` slots of each stack (slots past the stage's own layers of that stack are skipped).
    The KV cache is one set of pools over the stages' layers in order, whatever their stack:
    [S * ceil(L / S), ...] (stage s's cache layer j is its j-th layer).
    """

    stacks: tuple[Stack, ...]
    stage_layers: tuple[int, ...]  # real layers on each stage, all stacks
    num_kv_heads: int  # kv heads stored (replicated up to `tensor` when fewer)
    expert_shards: int  # the `expert` axis size: experts per device = num_experts / expert_shards
    vocab: int  # vocabulary stored: padded to a multiple of `tensor`
    ffn: int  # routed-expert FFN width stored: padded to a multiple of the MoE's tensor factor (`Layout.moe_tp`)
    shared_ffn: int  # shared-expert FFN width stored: padded to a multiple of tensor x expert (0: none)
    dense_ffn: int  # dense layers' FFN width stored: padded like the shared expert's (0: no dense layers)

    @classmethod
    def of(cls, cfg: ModelConfig, layout: Layout) -> Geometry:
        t, e = layout.tensor, layout.expert
        per_stage = layout.stage_layers(cfg.num_layers)
        starts = [sum(per_stage[:s]) for s in range(len(per_stage))]
        stacks, offsets = [], (0,) * len(per_stage)
        for name, ffn, lo, hi in (("dense_layers", "dense", 0, cfg.first_dense_layers),
                                  ("layers", "moe", cfg.first_dense_layers, cfg.num_layers)):
            if hi == lo:
                continue
            counts = tuple(max(0, min(hi, a + n) - max(lo, a)) for a, n in zip(starts, per_stage, strict=True))
            stacks.append(Stack(name, ffn, lo, counts, max(counts), offsets))
            offsets = tuple(o + c for o, c in zip(offsets, counts, strict=True))
        return cls(tuple(stacks), tuple(per_stage), layout.kv_heads_per_model(cfg), e, round_up(cfg.vocab_size, t),
                   round_up(cfg.moe_intermediate_size, layout.moe_tp),
                   round_up(cfg.shared_expert_intermediate_size, t * e),
                   round_up(cfg.dense_intermediate_size, t * e) if cfg.first_dense_layers else 0)

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def cache_layers_per_stage(self) -> int:
        """Cache layers per stage: the most layers any stage holds (stages' padding layers are never written)."""
        return max(self.stage_layers)

    @property
    def num_cache_layers(self) -> int:
        """Layers the KV pools hold: every stage's slots (padding slots are never written)."""
        return self.num_stages * self.cache_layers_per_stage

    def stack(self, name: str) -> Stack:
        return next(s for s in self.stacks if s.name == name)


class Block(nnx.Module):
    """A stack's decoder layers: norms, attention and an FFN of one kind, each weight stacked over its slots."""

    def __init__(self, cfg: ModelConfig, par: Parallelism, geo: Geometry, stack: Stack, dtype, quant=None):
        L, D = geo.num_stages * stack.layers_per_stage, cfg.hidden_size
        self.attn_norm = declare((L, D), ("layers", "embed"), dtype)
        self.mlp_norm = declare((L, D), ("layers", "embed"), dtype)
        self.attn = ATTENTION[cfg.attention](cfg, par, L, geo.num_kv_heads, dtype, quant)
        if stack.ffn == "moe":
            self.moe = MoE(cfg, par, L, geo.ffn, geo.shared_ffn, dtype, quant)
        else:
            self.mlp = DenseFFN(cfg, par, L, geo.dense_ffn, dtype, quant)
        if quant is not None and quant.names is not None:  # a checkpoint's scheme: what it stores in float stays float
            for prefix in ("attn", "moe", "mlp"):
                module = getattr(self, prefix, None)
                for attr, value in list(vars(module).items()) if module is not None else ():
                    if isinstance(value, Quantized) and not quant.quantizes(f"{prefix}.{attr}"):
                        setattr(module, attr, declare(value.shape, value.axes, value.dtype))

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP, eps, cache_layer, windowed):
        h_BTD = rms_norm(x_BTD, at_layer(self.attn_norm, layer), eps)
        a_BTD, cache = self.attn(layer, h_BTD, pos_BT, rope, cache, page_table_BP, cache_layer, windowed)
        x_BTD = x_BTD + a_BTD
        h_BTD = rms_norm(x_BTD, at_layer(self.mlp_norm, layer), eps)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x_BTD + ffn(layer, h_BTD, valid_BT=pos_BT >= 0), cache


ATTENTION = {"gqa": Attention, "mla": MLA}  # the attention kinds; each owns its cache layout


class Transformer(nnx.Module):
    """Weights of the whole model for one layout (stacked layers, padded sizes; see `Geometry`).

    `par` (a `Parallelism`, or a `Layout` for its defaults) is every parallel choice, fixed here: the modules
    keep it as static data and their collectives and shardings follow it.
    """

    def __init__(self, cfg: ModelConfig, par: Parallelism | Layout, dtype=jnp.float32, quantization: str | None = None):
        par = par if isinstance(par, Parallelism) else Parallelism(par)
        cfg.check_runtime_support()
        par.layout.validate(cfg)
        self.cfg, self.par, self.quantization = cfg, par, quantization
        self.geometry = geo = Geometry.of(cfg, par.layout)
        D, V = cfg.hidden_size, geo.vocab
        self.embed = declare((V, D), ("vocab", "embed"), dtype)
        if not cfg.tie_word_embeddings:
            self.unembed = declare((D, V), ("embed", "vocab"), dtype)
        self.final_norm = declare((D,), ("embed",), dtype)
        for stack in geo.stacks:
            setattr(self, stack.name, Block(cfg, par, geo, stack, dtype, quant.scheme(quantization)))

    def cache_layout(self) -> tuple[tuple[tuple[int, ...], tuple], ...]:
        """The KV pools' shapes and logical axes after [layers, pages, page_size]: the attention kind's."""
        return ATTENTION[self.cfg.attention].cache_layout(self.cfg, self.geometry.num_kv_heads)

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
        """This device's stage: each stack's local layers in order, one `lax.scan` per stack over its stacked
        weights. A slot past the stage's own layers of a stack is skipped (`lax.cond`: no FLOPs, no cache write)."""
        cfg, geo = self.cfg, self.geometry
        rope = Rope.of(cfg)
        rope = (rope, rope.tables(pos_BT))
        me = self.par.axis_index("layers")
        for stack in geo.stacks:
            block = getattr(self, stack.name)
            real = jnp.asarray(stack.stage_layers, jnp.int32)[me]
            offset = jnp.asarray(stack.cache_offsets, jnp.int32)[me] if len(set(stack.cache_offsets)) > 1 else \
                stack.cache_offsets[0]
            windowed = self._windowed(stack)

            def layer(carry, i, block=block, real=real, offset=offset, windowed=windowed, stack=stack):
                def run(x_, cache_):
                    w = None if windowed is None else windowed[me, i]
                    return block(i, x_, pos_BT, rope, cache_, page_table_BP, cfg.rms_norm_eps, offset + i, w)

                if all(n == stack.layers_per_stage for n in stack.stage_layers):  # no stage has empty slots
                    return run(*carry), None
                return jax.lax.cond(i < real, run, lambda x, c: (x, c), *carry), None

            (x_BTD, cache), _ = jax.lax.scan(layer, (x_BTD, cache), jnp.arange(stack.layers_per_stage))
        return x_BTD, cache

    def _windowed(self, stack: Stack):
        """[stages, slots] bool: slot j of stage s uses the sliding window; None when every layer is alike."""
        cfg = self.cfg
        if not cfg.sliding_window or cfg.sliding_layers is None:
            return None
        table = np.zeros((self.geometry.num_stages, stack.layers_per_stage), bool)
        for s in range(self.geometry.num_stages):
            for j, layer in enumerate(stack.layers_of_stage(s)):
                table[s, j] = cfg.window_of(layer) is not None
        return jnp.asarray(table)

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
            elif math.prod(x_D.shape[:-1]) == 1 and x_D.dtype == jnp.float32:
                # One float32 row: XLA's matrix-vector product streams the [D, V] table about twice as fast as the
                # native kernel (0.54x native at [512, 32000], 2026-12-06, 2-vCPU Zen 5, moejax.native's
                # measurements); from two rows on the native kernel is faster (1.1-1.4x). Not in bfloat16: XLA
                # converts the whole table to float32 every step, the native kernel reads half the bytes.
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
