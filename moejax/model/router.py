"""Routers: which experts each token uses, and with what weight. One function per kind (`ModelConfig.router`):

- "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2): softmax over all experts, then the top-k (DeepSeek-V2's
  group_limited_greedy: within the `topk_group` groups of highest maximum score), renormalised over the k when
  `norm_topk_prob`, times `routed_scaling_factor`.
- "sigmoid" (DeepSeek-V3, GLM-4.5): sigmoid scores; a per-expert correction bias (`score_bias`, a buffer learnt
  for load balance) is added for choosing only; experts sit in `n_group` groups, a group scores the sum of its
  two best, the `topk_group` best groups are kept and the top-k is taken inside them; the weights are the
  unbiased scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.
- "topk_softmax" (gpt-oss): router logits with a bias, top-k of the logits, softmax over those k.

Logits and weights in float32 whatever the serving dtype (numerics policy, `moejax.model.layers`). Returns
(weights [M, X] float32, expert ids [M, X] int32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig


def route(cfg: ModelConfig, x_MD, router_DE, bias_E=None, score_bias_E=None):
    logits_ME = jnp.einsum("MD,DE->ME", x_MD, router_DE, preferred_element_type=jnp.float32)
    if bias_E is not None:
        logits_ME = logits_ME + bias_E.astype(jnp.float32)
    return _ROUTERS[cfg.router](cfg, logits_ME, score_bias_E)


def _softmax(cfg: ModelConfig, logits_ME, _):
    probs_ME = jax.nn.softmax(logits_ME, axis=-1)
    if cfg.n_group > 1:  # a group scores its best expert
        probs_ME = _keep_groups(probs_ME, jnp.max(_grouped(cfg, probs_ME), axis=-1), cfg, 0.0)
    weights_MX, experts_MX = jax.lax.top_k(probs_ME, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights_MX = weights_MX / jnp.sum(weights_MX, axis=-1, keepdims=True)
    if cfg.routed_scaling_factor != 1.0:
        weights_MX = weights_MX * cfg.routed_scaling_factor
    return weights_MX, experts_MX.astype(jnp.int32)


def _grouped(cfg: ModelConfig, x_ME):
    M, E = x_ME.shape
    return x_ME.reshape(M, cfg.n_group, E // cfg.n_group)


def _keep_groups(x_ME, group_MG, cfg: ModelConfig, fill: float):
    """x with every expert outside the `topk_group` best groups (by `group_MG`) set to `fill`."""
    M, G = group_MG.shape
    _, keep_MK = jax.lax.top_k(group_MG, cfg.topk_group)
    kept_MG = jnp.zeros((M, G), bool).at[jnp.arange(M)[:, None], keep_MK].set(True)
    return jnp.where(kept_MG[:, :, None], _grouped(cfg, x_ME), fill).reshape(x_ME.shape)


def _sigmoid(cfg: ModelConfig, logits_ME, score_bias_E):
    scores_ME = jax.nn.sigmoid(logits_ME)
    choice_ME = scores_ME + score_bias_E.astype(jnp.float32)
    if cfg.n_group > 1:  # a group scores the sum of its two best
        group_MG = jnp.sum(jax.lax.top_k(_grouped(cfg, choice_ME), 2)[0], axis=-1)
        choice_ME = _keep_groups(choice_ME, group_MG, cfg, -jnp.inf)
    _, experts_MX = jax.lax.top_k(choice_ME, cfg.num_experts_per_tok)
    weights_MX = jnp.take_along_axis(scores_ME, experts_MX, axis=-1)
    if cfg.norm_topk_prob:
        weights_MX = weights_MX / (jnp.sum(weights_MX, axis=-1, keepdims=True) + 1e-20)
    return weights_MX * cfg.routed_scaling_factor, experts_MX.astype(jnp.int32)


def _topk_softmax(cfg: ModelConfig, logits_ME, _):
    top_MX, experts_MX = jax.lax.top_k(logits_ME, cfg.num_experts_per_tok)
    return jax.nn.softmax(top_MX, axis=-1), experts_MX.astype(jnp.int32)


_ROUTERS = {"softmax": _softmax, "sigmoid": _sigmoid, "topk_softmax": _topk_softmax}
