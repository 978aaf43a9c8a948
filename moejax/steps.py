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
        self.cache_spec = sharding.spec(CACHE_AXES)
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

        cache_specs = (self.cache_spec, self.cache_spec)
        fn = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(self.param_specs, cache_specs, BATCH, BATCH, BATCH, TOKENS_B),
                           out_specs=(LOGITS_BV, cache_specs), check_vma=False)
        logits_BV, cache = fn(params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B)
        logits_BV = jax.sharding.reshard(logits_BV, jax.NamedSharding(self.mesh, TOKENS_B))
        return logits_BV, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache

    def new_cache(self, num_pages: int, page_size: int, dtype=None):
        """Zeroed (k, v) page pools [L, num_pages, page_size, K, H]; pages split over `data`."""
        geo, cfg = self._model_meta()
        shape = (geo.num_layers_padded, num_pages, page_size, geo.num_kv_heads, cfg.head_dim)
        dtype = dtype or self.params["embed"].dtype
        make = jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=jax.NamedSharding(self.mesh, self.cache_spec))
        return make(), make()

    def _model_meta(self):
        model = nnx.merge(self.graphdef, self._abstract)
        return model.geometry, model.cfg


def put(mesh, array, spec: P):
    """Host array -> global array with `spec` on `mesh` (each device gets only its slice)."""
    return jax.device_put(array, jax.NamedSharding(mesh, spec))
