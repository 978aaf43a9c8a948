"""The MoE transformer: embedding, decoder blocks grouped by pipeline stage, final norm, unembedding.

`Transformer.run` is the local (per-shard) computation called inside `jax.shard_map` by
`moejax.steps`. Stages run one after another in this version: each stage runs its contiguous
group of layers when its turn comes (`lax.cond` on the stage index) and sends the activations to
the next stage (`ppermute`); the last stage's output is broadcast to all for the unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig, ceil_div
from moejax.mesh import Layout
from moejax.model.attention import Attention
from moejax.model.layers import declare, local, rms_norm, rope_tables
from moejax.model.moe import MoE


@dataclass(frozen=True)
class Geometry:
    """How a model is laid out for one Layout: layer slots per stage, stored kv heads, expert shards."""

    layers_per_stage: int
    num_kv_heads: int  # kv heads stored (replicated up to `tensor` when fewer)
    stage_layers: tuple[int, ...]  # real layers in each stage
    expert_shards: int  # the `expert` axis size: experts per device = num_experts / expert_shards

    @classmethod
    def of(cls, cfg: ModelConfig, layout: Layout) -> Geometry:
        per_stage = ceil_div(cfg.num_layers, layout.stage)
        return cls(per_stage, layout.kv_heads_per_model(cfg),
                   tuple(layout.stage_layers(cfg.num_layers)), layout.expert)

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    def slot_of_layer(self) -> list[int]:
        """Padded slot index of each real layer, in order."""
        slots = []
        for s, n in enumerate(self.stage_layers):
            slots += [s * self.layers_per_stage + j for j in range(n)]
        return slots


class Block(nnx.Module):
    """One decoder layer slot: norms, attention and MoE, one entry per stage on each weight's leading axis.

    Layer slot j of stage p is padded layer p * layers_per_stage + j (a zero-weight identity when
    the stage has fewer real layers). Each weight is its own buffer rather than a slice of a
    stacked [L, ...] array, so reading it costs no copy.
    """

    def __init__(self, cfg: ModelConfig, geo: Geometry, dtype):
        S, D = geo.num_stages, cfg.hidden_size
        self.attn_norm = declare((S, D), ("layers", "embed"), dtype)
        self.mlp_norm = declare((S, D), ("layers", "embed"), dtype)
        self.attn = Attention(cfg, S, geo.num_kv_heads, dtype)
        self.moe = MoE(cfg, S, geo.expert_shards, dtype)

    def __call__(self, x_BTD, pos_BT, rope, cache, page_table_BP, moe_strategy, eps):
        h_BTD = rms_norm(x_BTD, local(self.attn_norm), eps)
        a_BTD, cache = self.attn(h_BTD, pos_BT, rope, cache, page_table_BP)
        x_BTD = x_BTD + a_BTD
        h_BTD = rms_norm(x_BTD, local(self.mlp_norm), eps)
        return x_BTD + self.moe(h_BTD, moe_strategy, valid_BT=pos_BT >= 0), cache


class Transformer(nnx.Module):
    """Weights of the whole model for one layout (layer slots per stage, kv heads replicated as needed)."""

    def __init__(self, cfg: ModelConfig, layout: Layout, dtype=jnp.float32):
        cfg.check_runtime_support()
        layout.validate(cfg)
        self.cfg = cfg
        self.geometry = geo = Geometry.of(cfg, layout)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = declare((V, D), ("vocab", "embed"), dtype)
        if not cfg.tie_word_embeddings:
            self.unembed = declare((D, V), ("embed", "vocab"), dtype)
        self.final_norm = declare((D,), ("embed",), dtype)
        self.layers = nnx.List([Block(cfg, geo, dtype) for _ in range(geo.layers_per_stage)])

    # ---- local computation (inside shard_map) -------------------------------------------------

    def run(self, tokens_BT, pos_BT, cache, page_table_BP, *, logits_index_B=None, moe_strategy="auto"):
        """Logits for new tokens, writing their KV into `cache`.

        Args:
          tokens_BT: token ids (local batch). pos_BT: their positions; < 0 marks padding.
          cache: None (no cache: attend within tokens_BT) or one (k, v) pair of page pools per layer
            slot, local shards [1, P, page_size, K, H].
          page_table_BP: [B, pages per sequence] local page ids.
          logits_index_B: if given, only the logits at tokens_BT[b, logits_index_B[b]] are made.
        Returns:
          (logits [B, T, V_local] or [B, V_local], updated cache).
        """
        cfg = self.cfg
        x_BTD = self._embed(tokens_BT)
        rope = rope_tables(pos_BT, cfg.head_dim, cfg.rope_theta)

        def run_stage(x_BTD, cache):
            new_cache = []
            for j, block in enumerate(self.layers):
                x_BTD, kv = block(x_BTD, pos_BT, rope, None if cache is None else cache[j], page_table_BP,
                                  moe_strategy, cfg.rms_norm_eps)
                new_cache.append(kv)
            return x_BTD, None if cache is None else tuple(new_cache)

        num_stages = len(self.geometry.stage_layers)
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
                return jnp.einsum("...D,VD->...V", x_D, self.embed[...])
            return jnp.einsum("...D,DV->...V", x_D, self.unembed[...])
