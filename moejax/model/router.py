"""Routers: which experts each token uses, and with what weight. One function per kind (`ModelConfig.router`):

- "softmax" (Mixtral, Qwen, OLMoE): softmax over all experts, then the top-k, renormalised over the k when
  `norm_topk_prob`.
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
    weights_MX, experts_MX = jax.lax.top_k(jax.nn.softmax(logits_ME, axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights_MX = weights_MX / jnp.sum(weights_MX, axis=-1, keepdims=True)
    return weights_MX, experts_MX.astype(jnp.int32)


def _sigmoid(cfg: ModelConfig, logits_ME, score_bias_E):
    M, E = logits_ME.shape
    scores_ME = jax.nn.sigmoid(logits_ME)
    choice_ME = scores_ME + score_bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        G = cfg.n_group
        grouped = choice_ME.reshape(M, G, E // G)
        group_MG = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, keep_MK = jax.lax.top_k(group_MG, cfg.topk_group)
        kept_MG = jnp.zeros((M, G), bool).at[jnp.arange(M)[:, None], keep_MK].set(True)
        choice_ME = jnp.where(kept_MG[:, :, None], grouped, -jnp.inf).reshape(M, E)
    _, experts_MX = jax.lax.top_k(choice_ME, cfg.num_experts_per_tok)
    weights_MX = jnp.take_along_axis(scores_ME, experts_MX, axis=-1)
    if cfg.norm_topk_prob:
        weights_MX = weights_MX / (jnp.sum(weights_MX, axis=-1, keepdims=True) + 1e-20)
    return weights_MX * cfg.routed_scaling_factor, experts_MX.astype(jnp.int32)


def _topk_softmax(cfg: ModelConfig, logits_ME, _):
    top_MX, experts_MX = jax.lax.top_k(logits_ME, cfg.num_experts_per_tok)
    return jax.nn.softmax(top_MX, axis=-1), experts_MX.astype(jnp.int32)


_ROUTERS = {"softmax": _softmax, "sigmoid": _sigmoid, "topk_softmax": _topk_softmax}
