"""Jitted, sharded step functions: one `jax.shard_map` over the whole mesh around `Transformer.run`.

Weights and the KV cache are plain pytrees of global arrays; each function is compiled once per
input shape (callers bucket shapes). The KV cache is donated to the step, so writing a token
updates the pools in place instead of copying them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.model import moe
from moejax.model.layers import argmax
from moejax.model.transformer import Transformer

CACHE_AXES = ("layers", "cache_pages", "page_slot", "kv_heads", "head_dim")
BATCH = ("batch", None)  # logical axes of [B, T] inputs; specs depend on the expert mode (Steps.spec)
TOKENS = ("batch",)
STAGED = ("layers", "batch", None)  # [S, B, W] pipeline inputs: row s is stage s's microbatch
STAGED_TOKENS = ("layers", "batch")
ACTIVATIONS = ("layers", "batch", None, "embed")  # [S, rows, T, D]: what each stage received from the previous one


class Steps:
    """Compiled entry points for one placed model on one mesh.

    Args:
      model: a placed `Transformer`.
      mesh: the mesh its weights live on.
      moe_strategy: MoE dispatch strategy name (see `moejax.model.moe`).
      ep_attention: the expert axis's mode, "data" or "replicated" (see `moejax.sharding`).
      exchange: the "data" mode's token exchange (see `moejax.model.moe.EXCHANGES`).
    """

    def __init__(self, model: Transformer, mesh: jax.sharding.Mesh, moe_strategy: str = "auto",
                 ep_attention: str = "data", exchange: str = "auto"):
        self.mesh = mesh
        self.moe_strategy = moe.Strategy(moe_strategy, exchange).checked(mesh.devices.flat[0].platform)
        self.ep_attention = sharding.check_mode(ep_attention)
        self.graphdef, state = nnx.split(model)
        self.params = nnx.to_pure_dict(state)
        self._abstract = state
        with sharding.use(ep_attention):
            self.param_specs = nnx.to_pure_dict(jax.tree.map(
                lambda v: v.replace(sharding.spec(v.get_metadata()["out_sharding"])), state,
                is_leaf=lambda x: isinstance(x, nnx.Variable)))
            # One (k, v) pair of pools, each [L_pad, pages, page_size, K, H] (layers over `stage`).
            self.cache_specs = (sharding.spec(CACHE_AXES),) * 2
            self.batch_shards = sharding.axis_size(mesh, "batch")  # request groups: data (x expert in "data")
        self.geometry, self.cfg = self._model_meta()
        self.forward = jax.jit(self._forward)
        self.step = jax.jit(self._step, donate_argnums=(1,))
        self.pipeline_step = jax.jit(self._pipeline_step, donate_argnums=(1, 2))

    def spec(self, axes) -> P:
        """PartitionSpec of an array with these logical axes under this model's expert mode."""
        with sharding.use(self.ep_attention):
            return sharding.spec(axes)

    def named(self, axes) -> jax.NamedSharding:
        return jax.NamedSharding(self.mesh, self.spec(axes))

    def put(self, array, axes=BATCH):
        """Host array -> global array laid out with logical `axes` (each device gets only its slice)."""
        return jax.device_put(array, self.named(axes))

    def _model(self, params_local) -> Transformer:
        state = jax.tree.map(lambda x: x, self._abstract)
        nnx.replace_by_pure_dict(state, params_local)
        return nnx.merge(self.graphdef, state)

    def _forward(self, params, tokens_BT, pos_BT):
        with sharding.use(self.ep_attention):
            return self._forward_traced(params, tokens_BT, pos_BT)

    def _forward_traced(self, params, tokens_BT, pos_BT):
        def body(params_, tokens_, pos_):
            logits_, _ = self._model(params_).run(tokens_, pos_, None, None, moe_strategy=self.moe_strategy)
            return logits_

        batch = sharding.spec(BATCH)
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(self.param_specs, batch, batch),
                           out_specs=sharding.spec(("batch", None, "vocab")), check_vma=False)
        logits_BTV = jax.sharding.reshard(fn(params, tokens_BT, pos_BT), jax.NamedSharding(self.mesh, batch))
        return logits_BTV[..., : self.cfg.vocab_size]  # padded vocabulary columns are never returned

    def _step(self, params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B):
        """One prefill chunk or decode step: writes KV, returns (last logits [B, V], greedy ids [B], cache)."""
        with sharding.use(self.ep_attention):
            return self._step_traced(params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B)

    def _step_traced(self, params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B):

        def body(params_, cache_, tokens_, pos_, table_, index_):
            logits_, cache_ = self._model(params_).run(tokens_, pos_, cache_, table_, logits_index_B=index_,
                                                       moe_strategy=self.moe_strategy)
            return logits_, cache_

        fn = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(self.param_specs, self.cache_specs, *[sharding.spec(BATCH)] * 3,
                                     sharding.spec(TOKENS)),
                           out_specs=(sharding.spec(("batch", "vocab")), self.cache_specs), check_vma=False)
        logits_BV, cache = fn(params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B)
        logits_BV = self._gathered(logits_BV)
        return logits_BV, argmax(logits_BV), cache

    def _gathered(self, logits_BV):
        """Vocabulary-split logits -> rows split over `batch` only, padded vocabulary columns cut (never sampled)."""
        logits_BV = jax.sharding.reshard(logits_BV, jax.NamedSharding(self.mesh, sharding.spec(TOKENS)))
        return logits_BV[:, : self.cfg.vocab_size]

    def _pipeline_step(self, params, cache, x_SRTD, tokens_SBT, pos_SBT, page_table_SBP, logits_index_SB, active_S):
        """One tick of the pipelined schedule (`Transformer.pipeline_tick`).

        Row s of each [S, ...] input is the microbatch stage s works on this tick; `active_S[s]`
        says it is not empty. `x_SRTD` holds the activations each stage received last tick, R >= B
        rows per batch shard (one buffer serves every decode bucket: a tick uses its first B rows).
        Returns (logits [B, V] of the microbatch leaving the last stage, the activations for the
        next tick (donated and updated in place), the cache).
        """
        with sharding.use(self.ep_attention):
            def body(params_, cache_, x_, tokens_, pos_, table_, index_, active_):
                B = tokens_.shape[1]
                logits_, x_next, cache_ = self._model(params_).pipeline_tick(
                    tokens_[0], pos_[0], x_[0, :B], cache_, table_[0], index_[0], active_[0],
                    moe_strategy=self.moe_strategy)
                return logits_, x_.at[0, :B].set(x_next), cache_

            staged, x_spec = sharding.spec(STAGED), sharding.spec(ACTIVATIONS)
            fn = jax.shard_map(body, mesh=self.mesh,
                               in_specs=(self.param_specs, self.cache_specs, x_spec, staged, staged, staged,
                                         sharding.spec(STAGED_TOKENS), sharding.spec(("layers",))),
                               out_specs=(sharding.spec(("batch", "vocab")), x_spec, self.cache_specs),
                               check_vma=False)
            logits_BV, x_SRTD, cache = fn(params, cache, x_SRTD, tokens_SBT, pos_SBT, page_table_SBP,
                                          logits_index_SB, active_S)
            return self._gathered(logits_BV), x_SRTD, cache

    def new_activations(self, rows: int, num_tokens: int, dtype=None):
        """Zeroed in-flight activations of a pipeline, [stages, rows, num_tokens, D] (rows over `batch`)."""
        shape = (self.geometry.num_stages, rows, num_tokens, self.cfg.hidden_size)
        make = jax.jit(partial(jnp.zeros, shape, dtype or self.params["embed"].dtype),
                       out_shardings=self.named(ACTIVATIONS))
        return make()

    def cache_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        """Global shape of each of the k and v pools: [L_pad, num_pages, page_size, K, H]."""
        geo = self.geometry
        return (geo.num_layers, num_pages, page_size, geo.num_kv_heads, self.cfg.head_dim)

    def new_cache(self, num_pages: int, page_size: int, dtype=None):
        """Zeroed KV page pools: a (k, v) pair, each `cache_shape(...)`; layers split over `stage`,
        pages over `data`, kv heads over `tensor`.

        Stacked over layers (one buffer per pool), so the decoder's layer scan writes and gathers a
        layer's pages in place inside the loop (the pools are loop state and donated to the step)."""
        dtype = dtype or self.params["embed"].dtype
        make = jax.jit(partial(jnp.zeros, self.cache_shape(num_pages, page_size), dtype),
                       out_shardings=self.named(CACHE_AXES))
        return make(), make()

    def _model_meta(self):
        model = nnx.merge(self.graphdef, self._abstract)
        return model.geometry, model.cfg

