"""Per-request sampling: parameters (checked on the host) and the on-device sampler.

The sampler runs inside the jitted step on logits [B, V] float32, one row per request, and is
row-independent: a request's token depends only on its own logits, parameters, seed and how many
tokens it has made so far (the PRNG key is `fold_in(key(seed), num_generated)`), never on its row
or on its neighbours. That is what makes seeded sampling reproducible under in-flight batching and
across preemption (recompute replays the same keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off; seed None
    draws a seed from the engine's generator. Generation ends at a token in `stop_token_ids`
    (included in the output; finish reason "stop") or after `max_new_tokens` (reason "length").
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the bad value; called by `Engine.add_request`."""
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not isinstance(t, (int, float, np.floating)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, (int, float, np.floating)) or math.isnan(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {p!r}")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for t_id in self.stop_token_ids:
            if not isinstance(t_id, (int, np.integer)) or not 0 <= t_id < vocab_size:
                raise ValueError(f"stop token id {t_id!r} is out of vocabulary (vocab_size={vocab_size})")


def sample(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B):
    """Token ids [B] int32: argmax where temperature is 0, else a filtered, seeded draw.

    The filtered path (a sort over the vocabulary) only runs when some row samples.
    """
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    drawn_B = jax.lax.cond(jnp.any(temperature_B > 0), _draw, lambda *a: greedy_B,
                           logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B)


def _draw(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B):
    V = logits_BV.shape[-1]
    scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
    # top-k: keep logits >= the k-th largest (k = 0 keeps all).
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    ranks_V = jnp.arange(V)
    kth_B = _at_rank(sorted_BV, k_B - 1)
    # top-p over the top-k survivors: the smallest prefix whose probability reaches top_p.
    sorted_BV = jnp.where(ranks_V[None] < k_B[:, None], sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each rank
    keep_BV = (before_BV < top_p_B[:, None]) & (ranks_V[None] < k_B[:, None])
    last_B = jnp.sum(keep_BV, axis=-1) - 1  # >= 0: rank 0 always kept
    floor_B = jnp.maximum(_at_rank(sorted_BV, last_B), kth_B)
    masked_BV = jnp.where(scaled_BV >= floor_B[:, None], scaled_BV, -jnp.inf)
    gumbel_BV = jax.vmap(_gumbel, in_axes=(0, 0, None))(seed_B, counter_B, V)
    return jnp.argmax(masked_BV + gumbel_BV, axis=-1).astype(jnp.int32)


def _gumbel(seed, counter, V):
    key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), counter)
    return jax.random.gumbel(key, (V,), jnp.float32)


def _at_rank(sorted_BV, rank_B):
    """sorted_BV[b, rank_B[b]] as a masked sum: no gather, so it shards like any row-wise op."""
    hit_BV = jnp.arange(sorted_BV.shape[-1])[None] == rank_B[:, None]
    return jnp.sum(jnp.where(hit_BV, sorted_BV, 0), axis=-1)
