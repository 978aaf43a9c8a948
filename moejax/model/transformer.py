"""The MoE transformer: embedding, decoder layers stacked per pipeline stage, final norm, unembedding.

`Transformer.run` is the local (per-shard) computation called inside `jax.shard_map` by
`moejax.steps`. Every per-layer weight is ONE array stacked over the layers, [L_pad, ...] with
L_pad = stage * ceil(L / stage), split over `stage`; a stage runs its local layers with one
`lax.scan`, so the compiled program does not grow with the number of layers (nor, with the
stacked experts of `moejax.model.moe`, with the number of experts). Stages run one after another
in this version: each stage runs its layers when its turn comes (`lax.cond` on the stage index)
and sends the activations to the next stage (`ppermute`); the last stage's output is broadcast to
all for the unembedding.

Padding: a stage with fewer real layers than ceil(L / stage) holds zero-weight layers, each an
exact identity (zero attention and MoE outputs). The vocabulary is padded to a multiple of the
axes that split it (rows of zeros in the embedding, columns of zeros in the unembedding); the
padded logits are masked to -inf here and cut off by `moejax.steps`, so they are never sampled
or returned. FFN widths are padded with zero columns the same way (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig, ceil_div, round_up
from moejax.mesh import Layout
from moejax.model.attention import Attention
from moejax.model.layers import at_layer, declare, rms_norm, rope_tables
from moejax.model.moe import MoE


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

    def __init__(self, cfg: ModelConfig, geo: Geometry, dtype):
        L, D = geo.num_layers, cfg.hidden_size
        self.attn_norm = declare((L, D), ("layers", "embed"), dtype)
        self.mlp_norm = declare((L, D), ("layers", "embed"), dtype)
        self.attn = Attention(cfg, L, geo.num_kv_heads, dtype)
        self.moe = MoE(cfg, L, geo.ffn, geo.shared_ffn, dtype)

    def __call__(self, layer, x_BTD, pos_BT, rope, cache, page_table_BP, moe_strategy, eps):
        h_BTD = rms_norm(x_BTD, at_layer(self.attn_norm, layer), eps)
        a_BTD, cache = self.attn(layer, h_BTD, pos_BT, rope, cache, page_table_BP)
        x_BTD = x_BTD + a_BTD
        h_BTD = rms_norm(x_BTD, at_layer(self.mlp_norm, layer), eps)
        return x_BTD + self.moe(layer, h_BTD, moe_strategy, valid_BT=pos_BT >= 0), cache


class Transformer(nnx.Module):
    """Weights of the whole model for one layout (stacked layers, padded sizes; see `Geometry`)."""

    def __init__(self, cfg: ModelConfig, layout: Layout, dtype=jnp.float32):
        cfg.check_runtime_support()
        layout.validate(cfg)
        self.cfg = cfg
        self.geometry = geo = Geometry.of(cfg, layout)
        D, V = cfg.hidden_size, geo.vocab
        self.embed = declare((V, D), ("vocab", "embed"), dtype)
        if not cfg.tie_word_embeddings:
            self.unembed = declare((D, V), ("embed", "vocab"), dtype)
        self.final_norm = declare((D,), ("embed",), dtype)
        self.layers = Block(cfg, geo, dtype)

    # ---- local computation (inside shard_map) -------------------------------------------------

    def run(self, tokens_BT, pos_BT, cache, page_table_BP, *, logits_index_B=None, moe_strategy="auto"):
        """Logits for new tokens, writing their KV into `cache`.

        Args:
          tokens_BT: token ids (local batch). pos_BT: their positions; < 0 marks padding.
          cache: None (no cache: attend within tokens_BT) or a (k, v) pair of page pools, local
            shards [L_local, P, page_size, K, H].
          page_table_BP: [B, pages per sequence] local page ids.
          logits_index_B: if given, only the logits at tokens_BT[b, logits_index_B[b]] are made.
        Returns:
          (logits [B, T, V_local] or [B, V_local] (padded vocabulary columns are -inf), updated cache).
        """
        cfg = self.cfg
        x_BTD = self._embed(tokens_BT)
        rope = rope_tables(pos_BT, cfg.head_dim, cfg.rope_theta)

        def run_stage(x_BTD, cache):
            def layer(carry, i):
                x_BTD, cache = carry
                return self.layers(i, x_BTD, pos_BT, rope, cache, page_table_BP, moe_strategy, cfg.rms_norm_eps), None

            (x_BTD, cache), _ = jax.lax.scan(layer, (x_BTD, cache), jnp.arange(self.geometry.layers_per_stage))
            return x_BTD, cache

        num_stages = self.geometry.num_stages
        if num_stages == 1:
            x_BTD, cache = run_stage(x_BTD, cache)
        else:
            me = sharding.axis_index("layers")
            for s in range(num_stages):
                x_BTD, cache = jax.lax.cond(me == s, run_stage, lambda x, c: (x, c), x_BTD, cache)
                if s + 1 < num_stages:
                    x_BTD = sharding.ppermute(x_BTD, "layers", [(s, s + 1)])
            x_BTD = sharding.psum(jnp.where(me == num_stages - 1, x_BTD, 0), "layers")
        x_BTD = rms_norm(x_BTD, self.final_norm[...], cfg.rms_norm_eps)
        if logits_index_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_index_B[:, None, None], axis=1)[:, 0]
        return self._unembed(x_BTD), cache

    def _embed(self, tokens_BT):
        with jax.named_scope("embed"):
            table_VD = self.embed[...]
            local_BT = tokens_BT - sharding.axis_index("vocab") * table_VD.shape[0]
            here_BT = (local_BT >= 0) & (local_BT < table_VD.shape[0])
            x_BTD = jnp.where(here_BT[..., None], table_VD[jnp.where(here_BT, local_BT, 0)], 0)
            return sharding.psum(x_BTD, "vocab")

    def _unembed(self, x_D):
        with jax.named_scope("unembed"):
            if self.cfg.tie_word_embeddings:
                logits_V = jnp.einsum("...D,VD->...V", x_D, self.embed[...])
            else:
                logits_V = jnp.einsum("...D,DV->...V", x_D, self.unembed[...])
            if self.geometry.vocab == self.cfg.vocab_size:
                return logits_V
            V_local = logits_V.shape[-1]
            column_V = sharding.axis_index("vocab") * V_local + jnp.arange(V_local)
            return jnp.where(column_V < self.cfg.vocab_size, logits_V, -jnp.inf)  # padding: never chosen
