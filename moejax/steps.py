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
from moejax.model.transformer import Transformer

CACHE_AXES = ("layers", "cache_pages", "page_slot", "kv_heads", "head_dim")
BATCH = sharding.spec(("batch", None))
LOGITS_BV = sharding.spec(("batch", "vocab"))
LOGITS_BTV = sharding.spec(("batch", None, "vocab"))
TOKENS_B = sharding.spec(("batch",))


class Steps:
    """Compiled entry points for one placed model on one mesh.

    Args:
      model: a placed `Transformer`.
      mesh: the mesh its weights live on.
      moe_strategy: MoE dispatch strategy name (see `moejax.model.moe`).
    """

    def __init__(self, model: Transformer, mesh: jax.sharding.Mesh, moe_strategy: str = "auto"):
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        self.params = nnx.to_pure_dict(state)
        self._abstract = state
        self.param_specs = nnx.to_pure_dict(jax.tree.map(
            lambda v: v.replace(sharding.spec(v.get_metadata()["out_sharding"])), state,
            is_leaf=lambda x: isinstance(x, nnx.Variable)))
        self.moe_strategy = moe_strategy
        geo, _ = self._model_meta()
        # One (k, v) pair of pools per layer slot, each [stages, pages, page_size, K, H].
        self.cache_specs = tuple((sharding.spec(CACHE_AXES),) * 2 for _ in range(geo.layers_per_stage))
        self.forward = jax.jit(self._forward)
        self.step = jax.jit(self._step, donate_argnums=(1,))

    def _model(self, params_local) -> Transformer:
        state = jax.tree.map(lambda x: x, self._abstract)
        nnx.replace_by_pure_dict(state, params_local)
        return nnx.merge(self.graphdef, state)

    def _forward(self, params, tokens_BT, pos_BT):
        def body(params_, tokens_, pos_):
            logits_, _ = self._model(params_).run(tokens_, pos_, None, None, moe_strategy=self.moe_strategy)
            return logits_

        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(self.param_specs, BATCH, BATCH), out_specs=LOGITS_BTV,
                           check_vma=False)
        return fn(params, tokens_BT, pos_BT)

    def _step(self, params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B):
        """One prefill chunk or decode step: writes KV, returns (last logits [B, V], greedy ids [B], cache)."""

        def body(params_, cache_, tokens_, pos_, table_, index_):
            logits_, cache_ = self._model(params_).run(tokens_, pos_, cache_, table_, logits_index_B=index_,
                                                       moe_strategy=self.moe_strategy)
            return logits_, cache_

        fn = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(self.param_specs, self.cache_specs, BATCH, BATCH, BATCH, TOKENS_B),
                           out_specs=(LOGITS_BV, self.cache_specs), check_vma=False)
        logits_BV, cache = fn(params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B)
        logits_BV = jax.sharding.reshard(logits_BV, jax.NamedSharding(self.mesh, TOKENS_B))
        return logits_BV, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache

    def new_cache(self, num_pages: int, page_size: int, dtype=None):
        """Zeroed KV page pools: per layer slot a (k, v) pair [stages, num_pages, page_size, K, H];
        stages split over `stage`, pages over `data`, kv heads over `tensor`.

        Separate buffers per layer (not one [L, ...] array) let each step scatter into and gather
        from a layer's pool in place, without slicing the layer out first."""
        geo, cfg = self._model_meta()
        shape = (geo.num_stages, num_pages, page_size, geo.num_kv_heads, cfg.head_dim)
        dtype = dtype or self.params["embed"].dtype
        make = jax.jit(partial(jnp.zeros, shape, dtype),
                       out_shardings=jax.NamedSharding(self.mesh, sharding.spec(CACHE_AXES)))
        return tuple((make(), make()) for _ in range(geo.layers_per_stage))

    def _model_meta(self):
        model = nnx.merge(self.graphdef, self._abstract)
        return model.geometry, model.cfg


def put(mesh, array, spec: P):
    """Host array -> global array with `spec` on `mesh` (each device gets only its slice)."""
    return jax.device_put(array, jax.NamedSharding(mesh, spec))
