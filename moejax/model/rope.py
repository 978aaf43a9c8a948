"""Rotary position embeddings: the frequencies of each RoPE type (default, linear, YaRN) and their application
(rotated halves, or DeepSeek's interleaved pairs; all of the head or its first `rotary_dim` dims).

Frequencies follow Hugging Face's `modeling_rope_utils` formula by formula, in float32 as it computes them, so
positions agree to the last bit that matters at 1e-4 on the logits. `Rope.of(cfg)` is the one place a config's
RoPE is read; the attention kinds (`moejax.model.attention`, `moejax.model.mla`) call `tables` and `apply`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from moejax.config import ModelConfig


@dataclass(frozen=True)
class Rope:
    """A config's rotary embedding: which dims rotate, how (halves or interleaved pairs), at which frequencies.

    `cos_sin_scale` multiplies cos and sin (YaRN's attention factor, so q.k scales by its square);
    `softmax_scale` multiplies the scores (YaRN with `mscale_all_dim`, DeepSeek's MLA: mscale^2)."""

    rotary_dim: int
    theta: float
    rope_type: str
    factor: float
    original_max: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    interleave: bool
    cos_sin_scale: float
    softmax_scale: float

    @classmethod
    def of(cls, cfg: ModelConfig) -> Rope:
        cos_sin, softmax = 1.0, 1.0
        if cfg.rope_type == "yarn":
            factor = cfg.rope_factor
            if cfg.rope_attention_factor:
                cos_sin = cfg.rope_attention_factor
            elif cfg.rope_mscale and cfg.rope_mscale_all_dim:
                cos_sin = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim)
            else:
                cos_sin = _yarn_mscale(factor)
            if cfg.attention == "mla" and cfg.rope_mscale_all_dim:  # Hugging Face's yarn_apply_mscale
                softmax = _yarn_mscale(factor, cfg.rope_mscale_all_dim) ** 2
        return cls(cfg.rotary_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                   cfg.rope_original_max_position_embeddings, cfg.rope_beta_fast, cfg.rope_beta_slow,
                   cfg.rope_truncate, cfg.rope_interleave, float(cos_sin), float(softmax))

    def inv_freq(self):
        """[rotary_dim / 2] float32 inverse frequencies."""
        dim = self.rotary_dim
        pos_freqs = jnp.float32(self.theta) ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        inv = 1.0 / pos_freqs
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type != "yarn":
            return inv

        def correction_dim(rotations):
            return dim * math.log(self.original_max / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + inv * extrapolation

    def tables(self, positions_BT):
        """(cos, sin) [B, T, rotary_dim / 2] float32 for these positions."""
        angles = positions_BT.astype(jnp.float32)[..., None] * self.inv_freq()
        return jnp.cos(angles) * self.cos_sin_scale, jnp.sin(angles) * self.cos_sin_scale

    def apply(self, x_BTNH, cos_BTh, sin_BTh):
        """Rotate the first `rotary_dim` dims of each head (the rest pass through), in float32.

        Halves: (x1, x2) = the two halves; interleaved: x1 = even dims, x2 = odd dims (DeepSeek). Either way the
        result is (x1 cos - x2 sin, x2 cos + x1 sin) concatenated, as Hugging Face lays it out: q and k are laid
        out alike, so q.k is the rotated dot product."""
        x = x_BTNH.astype(jnp.float32)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        if self.interleave:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        else:
            half = self.rotary_dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
        cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
        return out.astype(x_BTNH.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
