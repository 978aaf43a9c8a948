"""Place weights from a source straight into their shardings, one device shard at a time.

A *source* serves canonical, layout-independent tensors (`read(name, layer, index)`); names and
shapes are listed by `canonical_shapes`. `place` builds each parameter of a `Transformer` with
`jax.make_array_from_callback`, so a device receives only its own shard and no full replicated
copy is ever made on a device. Layout-specific structure is applied here: padding layers (zeros)
on the layer axis and repeated kv heads when there are fewer kv heads than the tensor size.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig
from moejax.model.transformer import Transformer

Index = tuple[slice, ...]


class WeightSource(Protocol):
    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        """The canonical tensor `name` (of `layer`, or global when None) sliced by `index`."""


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical tensor name -> (shape without the layer axis, per-layer?) for one model config."""
    D, V, N, K, H = cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    E, F, Fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    out: dict[str, tuple[tuple[int, ...], bool]] = {"embed": ((V, D), False), "final_norm": ((D,), False)}
    if not cfg.tie_word_embeddings:
        out["unembed"] = ((D, V), False)
    layer = {
        "attn_norm": (D,), "mlp_norm": (D,),
        "attn.wq": (D, N, H), "attn.wk": (D, K, H), "attn.wv": (D, K, H), "attn.wo": (N, H, D),
        "moe.router": (D, E), "moe.wg": (E, D, F), "moe.wu": (E, D, F), "moe.wd": (E, F, D),
    }
    if cfg.qkv_bias:
        layer |= {"attn.bq": (N, H), "attn.bk": (K, H), "attn.bv": (K, H)}
    if cfg.o_bias:
        layer["attn.bo"] = (D,)
    if cfg.qk_norm:
        layer |= {"attn.q_norm": (H,), "attn.k_norm": (H,)}
    if Fs:
        layer |= {"moe.shared_wg": (D, Fs), "moe.shared_wu": (D, Fs), "moe.shared_wd": (Fs, D)}
    if cfg.shared_expert_gate:
        layer["moe.shared_gate"] = (D,)
    out |= {name: (shape, True) for name, shape in layer.items()}
    return out


def abstract_model(cfg: ModelConfig, layout, dtype) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, layout, dtype))


def place(model: Transformer, source: WeightSource, mesh: jax.sharding.Mesh) -> Transformer:
    """Fill an abstract `Transformer` with weights from `source`, each placed in its sharding."""
    graphdef, state = nnx.split(model)
    geo, cfg = model.geometry, model.cfg
    layer_of_slot = {slot: layer for layer, slot in enumerate(geo.slot_of_layer())}
    kv_repeat = geo.num_kv_heads // cfg.num_kv_heads
    experts_per_shard = cfg.num_experts // geo.expert_shards

    def build(path, var):
        name, layer_slot, expert_slot = _canonical(path)
        axes = var.get_metadata()["out_sharding"]
        shape, dtype = var.get_value().shape, var.get_value().dtype

        def read(stage: int, index: Index) -> np.ndarray:
            """This weight's block for one stage; `index` excludes the stage axis."""
            layer = layer_of_slot.get(stage * geo.layers_per_stage + layer_slot)
            sub_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape[1:], strict=True))
            if layer is None:  # padding layer slot: zero weights make the block an exact identity
                return np.zeros(sub_shape, np.float32)
            if expert_slot is None:
                return _read_kv(source, name, layer, index, axes[1:], kv_repeat)
            experts = [s * experts_per_shard + expert_slot for s in range(*index[0].indices(shape[1]))]
            return np.concatenate([_read_kv(source, name, layer, (slice(e, e + 1), *index[1:]), axes[1:], kv_repeat)
                                   for e in experts])

        def shard(index: Index) -> np.ndarray:
            if layer_slot is None:
                block = _read_kv(source, name, None, index, axes, kv_repeat)
            else:
                block = np.stack([read(p, index[1:]) for p in range(*index[0].indices(shape[0]))])
            return np.asarray(block, dtype=dtype)

        return jax.make_array_from_callback(shape, sharding.named(mesh, axes), shard)

    values = {path: build(path, var) for path, var in _variables(state)}
    state = jax.tree_util.tree_map_with_path(lambda p, v: values.get(p, v), state)
    return nnx.merge(graphdef, state)


def _canonical(path) -> tuple[str, int | None, int | None]:
    """A parameter's state path -> (canonical name, layer slot, local expert slot).

    `layers.3.attn.wq` -> ("attn.wq", 3, None); `layers.3.moe.experts.2.wg` -> ("moe.wg", 3, 2);
    `embed` -> ("embed", None, None).
    """
    keys = [p.key for p in path[:-1] if hasattr(p, "key")]
    if keys[0] != "layers":
        return ".".join(map(str, keys)), None, None
    layer_slot, rest = keys[1], keys[2:]
    if rest[:2] == ["moe", "experts"]:
        return f"moe.{rest[3]}", layer_slot, rest[2]
    return ".".join(rest), layer_slot, None


def _variables(state):
    """(path, Variable) pairs of an nnx State, path ending at the variable's `.value`."""
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = state
        for key in path[:-1]:
            node = node[key.key]
        yield path, node


def _read_kv(source, name, layer, index, axes, kv_repeat):
    """Read a slice, mapping stored kv heads back to the checkpoint's when they are repeated."""
    if kv_repeat == 1 or "kv_heads" not in axes:
        return source.read(name, layer, tuple(index))
    d = list(axes).index("kv_heads")
    stored = range(*index[d].indices(10**9))
    wanted = sorted({k // kv_repeat for k in stored})
    full = list(index)
    full[d] = slice(wanted[0], wanted[-1] + 1)
    block = source.read(name, layer, tuple(full))
    return np.take(block, [k // kv_repeat - wanted[0] for k in stored], axis=d)


class RandomSource:
    """Deterministic random weights, independent of the layout (a name/layer keyed generator)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, scale: float = 1.0):
        self.cfg, self.seed, self.scale = cfg, seed, scale
        self.shapes = canonical_shapes(cfg)
        self._cache: dict[tuple[str, int | None], np.ndarray] = {}

    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        key = (name, layer)
        if key not in self._cache:
            self._cache = {key: self._make(name, layer)}  # keep one tensor: shards of it come together
        return self._cache[key][index]

    def _make(self, name: str, layer: int | None) -> np.ndarray:
        shape = self.shapes[name][0]
        digest = hashlib.sha256(f"{self.seed}/{name}/{layer}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        cfg = self.cfg
        fan_in = {"embed": 1, "attn.wo": cfg.num_heads * cfg.head_dim, "moe.wd": cfg.moe_intermediate_size,
                  "moe.shared_wd": cfg.shared_expert_intermediate_size}.get(name, cfg.hidden_size)
        std = self.scale / np.sqrt(fan_in)
        return (std * rng.standard_normal(shape)).astype(np.float32)
