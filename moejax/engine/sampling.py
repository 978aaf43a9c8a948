"""Per-request sampling: parameters and prompts (checked on the host) and the on-device sampler.

`SamplingParams.check`, `check_prompt` and `check_context` are the one set of request checks: the engine's
`add_request` and `Model.generate` / `Model.forward` both call them, so the same mistake gets the same message.

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

from moejax.model.layers import argmax


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
        """Raise ValueError naming the field, the value and the allowed range; called by `Engine.add_request`.

        Runs on the host before anything is packed into the int32 call batch, so every value that passes
        packs exactly. Python and numpy numbers are accepted alike; booleans are not numbers. Bounds:

        - max_new_tokens: integer in [1, 2**31 - 1] (the engine then bounds prompt + max_new_tokens by its
          context limit).
        - temperature: finite number in [0, 3.4e38] (float32 range). The sampler treats temperatures below
          1e-6 as 1e-6, and one that float32 rounds (or flushes) to 0 as greedy: both are the greedy limit.
        - top_k: integer in [0, 2**31 - 1]; 0 (or any k >= the vocabulary) keeps every token.
        - top_p: number in [1.2e-38, 1] (a normal float32 > 0: smaller values would underflow to 0 on
          device). Any top_p at or below the top token's probability keeps only that token, so 1e-6 is
          already "top token only".
        - seed: None or an integer in [0, 2**32 - 1].
        - stop_token_ids: a tuple or list of integer token ids in [0, vocab_size).
        """
        _check_int("max_new_tokens", self.max_new_tokens, 1, _INT32_MAX)
        _check_real("temperature", self.temperature, 0.0, _FLOAT32_MAX, "be a finite number >= 0",
                    "[0, 3.4028235e+38] (float32 overflows above)")
        _check_int("top_k", self.top_k, 0, _INT32_MAX, "; 0: off")
        _check_real("top_p", self.top_p, _FLOAT32_TINY, 1.0, "lie in (0, 1]",
                    "[1.1754944e-38, 1] (smaller values underflow float32 to 0; any top_p at or below the top "
                    "token's probability, e.g. 1e-6, keeps only that token)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**32 - 1, "; or None: drawn by the engine")
        stops = self.stop_token_ids
        if not isinstance(stops, (tuple, list)):
            raise ValueError(f"stop_token_ids must be a tuple or list of token ids, got {type(stops).__name__} "
                             f"{stops!r}")
        for t_id in stops:
            if not _is_int(t_id):
                raise ValueError(f"stop token id {t_id!r} in stop_token_ids is not an integer")
            if not 0 <= t_id < vocab_size:
                raise ValueError(f"stop token id {t_id!r} is out of vocabulary (vocab_size={vocab_size}); "
                                 f"allowed: [0, {vocab_size - 1}]")


def check_prompt(prompt_ids, vocab_size: int, name: str = "prompt") -> list[int]:
    """The prompt as a list of Python ints; ValueError (naming `name`) unless a non-empty 1-D sequence of integer
    token ids in [0, vocab_size). Floats, strings and booleans are refused, never cast (1.7 is not token 1)."""
    try:
        ids = np.asarray(prompt_ids)
    except (ValueError, TypeError):  # e.g. ragged nested lists
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got {prompt_ids!r:.80}") from None
    if ids.size == 0:
        raise ValueError(f"{name} cannot be empty: pass at least one token id")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got shape {ids.shape} dtype {ids.dtype} "
                         f"({prompt_ids!r:.80})")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"Token id {int(bad[0])} is out of vocabulary (vocab_size={vocab_size}) in {name}; allowed: "
                         f"[0, {vocab_size - 1}]")
    return ids.astype(int).tolist()


def check_context(prompt_len: int, max_new_tokens: int, limit: int, name: str = "prompt") -> None:
    """ValueError unless the prompt plus every token it may generate fits the context limit."""
    total = prompt_len + max_new_tokens
    if total > limit:
        raise ValueError(f"{name} of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the "
                         f"context limit max_model_len={limit}")


def check_int(name: str, value, lo: int, hi: int | None = None, note: str = "") -> None:
    """ValueError unless `value` is an integer (Python or numpy, not bool) in [lo, hi] (hi: int32 max)."""
    _check_int(name, value, lo, _INT32_MAX if hi is None else hi, note)


_INT32_MAX = 2**31 - 1  # integer fields are packed into the int32 call batch
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32 > 0


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _not_a_number(value) -> str:
    return " (booleans are not numbers)" if isinstance(value, (bool, np.bool_)) else ""


def _check_int(name: str, value, lo: int, hi: int, note: str = "") -> None:
    """Raise ValueError unless `value` is an integer (Python or numpy, not bool) in [lo, hi]."""
    if not _is_int(value):
        what = "be an integer" + _not_a_number(value)
    elif value < lo:
        what = f"be at least {lo}"
    elif value > hi:
        what = f"be at most {hi}"
    else:
        return
    raise ValueError(f"{name} must {what}, got {value!r}; allowed: integers in [{lo}, {hi}]{note}")


def _check_real(name: str, value, lo: float, hi: float, what: str, allowed: str) -> None:
    """Raise ValueError unless `value` is a real number (Python or numpy, not bool or NaN) in [lo, hi]."""
    ok = _is_int(value) or (isinstance(value, (float, np.floating)) and not math.isnan(value))
    if ok and lo <= value <= hi:
        return
    raise ValueError(f"{name} must {what}{_not_a_number(value)}, got {value!r}; allowed: {allowed}")


def sample(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B):
    """Token ids [B] int32: argmax where temperature is 0, else a filtered, seeded draw.

    The filtered path (a sort over the vocabulary) only runs when some row samples.
    """
    greedy_B = argmax(logits_BV)
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
    return argmax(masked_BV + gumbel_BV)


def _gumbel(seed, counter, V):
    key = jax.random.fold_in(jax.random.key(seed.astype(jnp.uint32)), counter)
    return jax.random.gumbel(key, (V,), jnp.float32)


def _at_rank(sorted_BV, rank_B):
    """sorted_BV[b, rank_B[b]] as a masked sum: no gather, so it shards like any row-wise op."""
    hit_BV = jnp.arange(sorted_BV.shape[-1])[None] == rank_B[:, None]
    return jnp.sum(jnp.where(hit_BV, sorted_BV, 0), axis=-1)
