"""Jitted, sharded step functions: one `jax.shard_map` over the whole mesh around `Transformer.run`.

`Steps` is the one handle on a placed model's weights: the module's graph (`graphdef`, static: the config, the
geometry and the `Parallelism`) and its placed arrays (`params`, a nested dict) with their partition specs
(`param_specs`). Inside each step the module is merged from the two (`nnx.merge`, at trace time only). The KV
cache is a plain tuple of the attention kind's pools, each a global array or a `moejax.kv_cache.QuantizedPool`
(1-byte values and their float32 scales), donated to the step, so writing a token updates the pools in place.
Each function is compiled once per input shape (callers bucket shapes).

Every `shard_map` runs with `check_vma=True`: JAX checks that what the out_specs call replicated is (a missing
`psum`, or a value that still differs per stage, is a trace-time error, not a wrong number). The one exception is
a CPU program running the Pallas grouped GEMM in interpret mode (`manual.checks_replication`: a JAX interpreter
limitation; tests only).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import kv_cache, manual, native
from moejax.model.attention import CACHE_PREFIX
from moejax.model.layers import argmax
from moejax.model.transformer import Transformer

CACHE_AXES = ("layers", "cache_pages", "page_slot", "kv_heads", "head_dim")  # a GQA pool's (`cache_layout`)
BATCH = ("batch", None)  # logical axes of [B, T] inputs
TOKENS = ("batch",)
STAGED = ("layers", "batch", None)  # [S, B, W] pipeline inputs: row s is stage s's microbatch
STAGED_TOKENS = ("layers", "batch")
ACTIVATIONS = ("layers", "batch", None, "embed")  # [S, R, T, D]: what each stage received from the previous one


class Steps:
    """Compiled entry points for one placed model on one mesh, and the handle on its weights.

    Args:
      model: a placed `Transformer` (its `par` fixes every parallel choice).
      mesh: the mesh its weights live on.
    """

    def __init__(self, model: Transformer, mesh: jax.sharding.Mesh):
        self.mesh, self.par = mesh, model.par
        self.cfg, self.geometry, self.quantization = model.cfg, model.geometry, model.quantization
        self.graphdef, state = nnx.split(model)
        self.params = nnx.to_pure_dict(state)
        self.param_specs = nnx.to_pure_dict(jax.tree.map(
            lambda v: v.replace(self.par.spec(v.get_metadata()["out_sharding"])), state,
            is_leaf=lambda x: isinstance(x, nnx.Variable)))
        # The attention kind's pools (GQA: a (k, v) pair, each [L_cache, pages, page_size, K, H]; MLA: one latent
        # pool [L_cache, pages, page_size, 1, R + r]); layers over `stage`, pages over the batch shards.
        self.cache_axes = tuple(CACHE_PREFIX + axes for _, axes in model.cache_layout())
        self._cache_tails = tuple(shape for shape, _ in model.cache_layout())
        self.platform = native.mesh_platform(mesh)
        self.check_vma = manual.checks_replication(self.platform, self.par.moe_strategy)
        self.forward = jax.jit(self._forward)
        self.step = jax.jit(self._step, donate_argnums=(1,))
        self.pipeline_step = jax.jit(self._pipeline_step, donate_argnums=(1, 2))

    # ---- what the engine uses (`moejax.engine.batch.Runner`) -----------------------------------

    @property
    def batch_shards(self) -> int:
        """Groups the requests are split into: `data`, times `expert` in the dp_attention expert mode."""
        return self.par.batch_shards

    @property
    def num_stages(self) -> int:
        return self.geometry.num_stages

    def spec(self, axes) -> P:
        """PartitionSpec of an array with these logical axes."""
        return self.par.spec(axes)

    def named(self, axes) -> jax.NamedSharding:
        return self.par.named(self.mesh, axes)

    def put(self, array, axes=BATCH):
        """Host array -> global array laid out with logical `axes` (each device gets only its slice)."""
        return jax.device_put(array, self.named(axes))

    def cache_shapes(self, num_pages: int, page_size: int) -> tuple[tuple[int, ...], ...]:
        """Global shape of each KV pool: [L_cache, num_pages, page_size, *the attention kind's tail]."""
        return tuple((self.geometry.num_cache_layers, num_pages, page_size, *tail) for tail in self._cache_tails)

    def new_cache(self, num_pages: int, page_size: int, dtype=None):
        """Zeroed KV page pools, one per `cache_shapes(...)` entry (the attention kind's layout); layers split over
        `stage`, pages over the batch shards, kv heads over `tensor` (an MLA latent is replicated over it).

        dtype: the pools' float dtype (default the serving dtype), or a quantized KV cache dtype
        (`moejax.config.KV_CACHE_DTYPES`: each pool a `moejax.kv_cache.QuantizedPool`, 1-byte values of these
        shapes and a float32 scale per vector along the last axis, split like the values).

        Stacked over layers (one buffer per pool), so the decoder's layer scan writes and gathers a
        layer's pages in place inside the loop (the pools are loop state and donated to the step)."""
        dtype = dtype or self.params["embed"].dtype

        def zeros(shape, dtype_, axes):
            return jax.jit(partial(jnp.zeros, shape, dtype_), out_shardings=self.named(axes))()

        def pool(shape, axes):
            if isinstance(dtype, str) and dtype in kv_cache.STORAGE:
                return kv_cache.QuantizedPool(zeros(shape, kv_cache.STORAGE[dtype], axes),
                                              zeros(shape[:-1], jnp.float32, axes[:-1]))
            return zeros(shape, dtype, axes)

        return tuple(pool(shape, axes) for shape, axes in
                     zip(self.cache_shapes(num_pages, page_size), self.cache_axes, strict=True))

    def cache_specs_of(self, cache):
        """The partition specs of a cache's pools, in its structure (a quantized pool's values and scales)."""
        return tuple(kv_cache.pool_specs(pool, axes, self.spec) for pool, axes in
                     zip(cache, self.cache_axes, strict=True))

    def new_activations(self, rows: int, num_tokens: int, dtype=None):
        """Zeroed in-flight activations of a pipeline, [stages, rows, num_tokens, D] (rows over `batch`)."""
        shape = (self.geometry.num_stages, rows, num_tokens, self.cfg.hidden_size)
        make = jax.jit(partial(jnp.zeros, shape, dtype or self.params["embed"].dtype),
                       out_shardings=self.named(ACTIVATIONS))
        return make()

    def with_moe(self, moe_strategy: str | None = None, exchange: str | None = None) -> Steps:
        """These weights (not copied) compiled with another MoE dispatch strategy or token exchange: the same
        layout and expert mode, so the same shardings."""
        par = self.par.replace(**{k: v for k, v in (("moe_strategy", moe_strategy), ("exchange", exchange))
                                  if v is not None}).checked(self.platform)
        dtype = self.params["embed"].dtype
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(self.cfg, par, dtype, self.quantization)))
        return Steps(nnx.merge(graphdef, self.params), self.mesh)

    # ---- the compiled functions ----------------------------------------------------------------

    def _model(self, params_local) -> Transformer:
        return nnx.merge(self.graphdef, params_local)

    def _forward(self, params, tokens_BT, pos_BT):
        def body(params_, tokens_, pos_):
            logits_, _ = self._model(params_).run(tokens_, pos_, None, None)
            return logits_

        batch = self.spec(BATCH)
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(self.param_specs, batch, batch),
                           out_specs=self.spec(("batch", None, "vocab")), check_vma=self.check_vma)
        logits_BTV = jax.sharding.reshard(fn(params, tokens_BT, pos_BT), jax.NamedSharding(self.mesh, batch))
        return logits_BTV[..., : self.cfg.vocab_size]  # padded vocabulary columns are never returned

    def _step(self, params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B):
        """One prefill chunk or decode step: writes KV, returns (last logits [B, V], greedy ids [B], cache)."""

        def body(params_, cache_, tokens_, pos_, table_, index_):
            return self._model(params_).run(tokens_, pos_, cache_, table_, logits_index_B=index_)

        batch, cache_specs = self.spec(BATCH), self.cache_specs_of(cache)
        fn = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(self.param_specs, cache_specs, batch, batch, batch, self.spec(TOKENS)),
                           out_specs=(self.spec(("batch", "vocab")), cache_specs), check_vma=self.check_vma)
        logits_BV, cache = fn(params, cache, tokens_BT, pos_BT, page_table_BP, logits_index_B)
        logits_BV = self._gathered(logits_BV)
        return logits_BV, argmax(logits_BV), cache

    def _gathered(self, logits_BV):
        """Vocabulary-split logits -> rows split over `batch` only, padded vocabulary columns cut (never sampled)."""
        logits_BV = jax.sharding.reshard(logits_BV, self.named(TOKENS))
        return logits_BV[:, : self.cfg.vocab_size]

    def _pipeline_step(self, params, cache, x_SRTD, tokens_SBT, pos_SBT, page_table_SBP, logits_index_SB, active_S):
        """One tick of the pipelined schedule (`Transformer.pipeline_tick`).

        Row s of each [S, ...] input is the microbatch stage s works on this tick; `active_S[s]`
        says it is not empty. `x_SRTD` holds the activations each stage received last tick, R >= B
        rows per batch shard (one buffer serves every decode bucket: a tick uses its first B rows).
        Returns (logits [B, V] of the microbatch leaving the last stage, the activations for the
        next tick (donated and updated in place), the cache).
        """

        def body(params_, cache_, x_, tokens_, pos_, table_, index_, active_):
            B = tokens_.shape[1]
            logits_, x_next, cache_ = self._model(params_).pipeline_tick(
                tokens_[0], pos_[0], x_[0, :B], cache_, table_[0], index_[0], active_[0])
            return logits_, x_.at[0, :B].set(x_next), cache_

        staged, x_spec, cache_specs = self.spec(STAGED), self.spec(ACTIVATIONS), self.cache_specs_of(cache)
        fn = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(self.param_specs, cache_specs, x_spec, staged, staged, staged,
                                     self.spec(STAGED_TOKENS), self.spec(("layers",))),
                           out_specs=(self.spec(("batch", "vocab")), x_spec, cache_specs),
                           check_vma=self.check_vma)
        logits_BV, x_SRTD, cache = fn(params, cache, x_SRTD, tokens_SBT, pos_SBT, page_table_SBP,
                                      logits_index_SB, active_S)
        return self._gathered(logits_BV), x_SRTD, cache
