"""Place weights from a source straight into their shardings, one device shard at a time.

A *source* serves canonical, layout-independent tensors (`read(name, layer, index)`, and `read_into`
when it can fill a given array); names and shapes are listed by `canonical_shapes`. `place` builds
each parameter of a `Transformer` block by block (`_assemble`): each distinct shard is read once into
one zeroed, aligned host block, which `device_put` copies to the devices holding it (on CPU it aliases
the block: no copy), so a device receives only its own shard, no full replicated copy is ever made,
and host memory beyond the placed weights is the source's bounded read pieces.

Layout-specific structure is applied here, from the difference between a parameter's declared shape
and its canonical shape: padding layers (zeros) on the stacked layer axis, zero padding of dims
stored larger than the checkpoint's (vocabulary, FFN widths: see `moejax.model.transformer.Geometry`),
and repeated kv heads when there are fewer kv heads than the tensor size.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig
from moejax.model.transformer import Transformer

Index = tuple[slice, ...]


class WeightSource(Protocol):
    def read(self, name: str, layer: int | None, index: Index) -> np.ndarray:
        """The canonical tensor `name` (of `layer`, or global when None) sliced by `index`.

        A source may also offer `read_into(name, layer, index, out)`, filling `out` (any dtype) in place;
        `place` then uses it, with no temporary the size of the slice."""


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """Canonical tensor name -> (shape without the layer axis, the global layers that carry it (None: a global
    tensor)) for one model config.

    Derived from the model's own declarations (`moejax.model`) at the trivial layout, where nothing
    is padded or repeated: each weight's shape is written once, there. A name may be carried by several stacks
    (attention in dense and MoE layers alike): its layers are the union.
    """
    from moejax.mesh import Layout

    model = abstract_model(cfg, Layout(), np.float32)
    _, state = nnx.split(model)
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {}
    for path, var in _variables(state):
        name, stack = _canonical(path)
        shape = tuple(var.get_value().shape)
        if stack is None:
            out[name] = (shape, None)
            continue
        layers = tuple(model.geometry.stack(stack).slot_of_layer())
        if name in out:
            assert out[name][0] == shape[1:], (name, out[name][0], shape)
            layers = tuple(sorted(set(out[name][1]) | set(layers)))
        out[name] = (shape[1:], layers)
    return out


def quantized_shapes(cfg: ModelConfig, scheme) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Canonical name -> (values shape, scale shape), without the layer axis, of each weight `scheme` (a
    `moejax.quant.Scheme`) quantizes, at the trivial layout: the layout-independent scale resolution (a stored
    scheme's tiles of gcd(block, dim)), which any layout's tiles divide."""
    from moejax.mesh import Layout
    from moejax.quant import Quantized

    model = abstract_model(cfg, Layout(), np.float32, scheme)
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Quantized):
            stacked = str(path[0]) in STACKS
            name = ".".join(str(p) for p in (path[1:] if stacked else path))
            values, scale = tuple(node.values.get_value().shape), tuple(node.scale.get_value().shape)
            out[name] = (values[1:], scale[1:]) if stacked else (values, scale)
    return out


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the checkpoint (canonical tensors, every layer that carries them; no padding)."""
    return sum(math.prod(shape) * (len(layers) if layers is not None else 1)
               for shape, layers in canonical_shapes(cfg).values())


def abstract_model(cfg: ModelConfig, par, dtype, quantization: str | None = None) -> Transformer:
    """The model's declarations with no memory behind them; `par`: a `Parallelism` (or a `Layout`);
    `quantization`: a post-training weight quantization (`moejax.quant.QUANTIZATIONS`) or None."""
    return nnx.eval_shape(lambda: Transformer(cfg, par, dtype, quantization))


def place(model: Transformer, source: WeightSource, mesh: jax.sharding.Mesh) -> Transformer:
    """Fill an abstract `Transformer` with weights from `source`, each placed in its sharding."""
    if isinstance(source, DeviceRandomSource):
        return source.place(model, mesh)
    graphdef, state = nnx.split(model)
    geo, cfg = model.geometry, model.cfg
    kv_repeat = geo.num_kv_heads // cfg.num_kv_heads
    canonical = canonical_shapes(cfg)

    def build(path, var):
        name, stack = _canonical(path)
        part = None
        if name.endswith((".values", ".scale")):  # a quantized weight (`moejax.quant.Quantized`)
            name, part = name.rsplit(".", 1)
        stacked = stack is not None
        layer_of_slot = {slot: layer for layer, slot in geo.stack(stack).slot_of_layer().items()} if stacked else {}
        axes = var.get_metadata()["out_sharding"]
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if part is not None:  # read the float weight, quantize each block whole (scales from whole contracted dims)
            qmod = _module_at(model, path)
            float_axes = qmod.values.get_metadata()["out_sharding"]
            float_shape = qmod.shape
        else:
            float_axes, float_shape = axes, shape
        inner_axes, inner_shape = (float_axes[1:], float_shape[1:]) if stacked else (float_axes, float_shape)
        limit = canonical[name][0]  # checkpoint sizes; stored dims beyond them are zero padding

        def read(layer: int | None, index: Index, out: np.ndarray, src) -> None:
            """Fill `out` (zeroed, this weight's block of one layer) from the source `src`."""
            if stacked and layer is None:  # a padding layer: zero weights make it an exact identity
                return
            kept = tuple(_clip(s, n, c, axis == "kv_heads")
                         for s, n, c, axis in zip(index, inner_shape, limit, inner_axes, strict=True))
            if all(k is not None for k in kept):
                _read_kv(src, name, layer, tuple(k[0] for k in kept), inner_axes, kv_repeat,
                         out[tuple(slice(0, k[1]) for k in kept)])

        def float_shard(index: Index, block_dtype, src=source) -> np.ndarray:
            block = _aligned_zeros(tuple(len(range(*s.indices(n))) for s, n in zip(index, float_shape, strict=True)),
                                   block_dtype)
            if not stacked:
                read(None, index, block, src)
            else:
                for i, slot in enumerate(range(*index[0].indices(float_shape[0]))):
                    read(layer_of_slot.get(slot), index[1:], block[i], src)
            return block

        def quantized_shard(index: Index) -> np.ndarray:
            from moejax import quant

            scale_shape = qmod.scale.get_value().shape
            whole = tuple(slice(None) if d in qmod.contracted else s for d, s in enumerate(index))
            blocks = tuple(scale_shape[d] for d in qmod.contracted)
            values, scale = quant.quantize_block(float_shard(whole, np.float32), qmod.contracted,
                                                 qmod.scheme, blocks, dtype if part == "scale"
                                                 else qmod.scale.get_value().dtype)
            picked = values if part == "values" else scale
            local = picked[tuple(s if d in qmod.contracted else slice(None) for d, s in enumerate(index))]
            out = _aligned_zeros(local.shape, local.dtype)
            out[...] = local
            return out

        def stored_shard(index: Index) -> np.ndarray:
            """A checkpoint's own quantized values, or its scales: each element's, one per tile of the scale."""
            if part == "values":
                return float_shard(index, dtype, StoredPart(source, "values", dtype))
            tiles = [n // m for n, m in zip(float_shape, shape, strict=True)]  # 1 but along tiled contracted dims
            bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
            elements = tuple(slice(a * t, b * t) for (a, b), t in zip(bounds, tiles, strict=True))
            per_element = float_shard(elements, np.float32, StoredPart(source, "scale", np.float32))
            picked = per_element[tuple(slice(None, None, t) for t in tiles)]
            out = _aligned_zeros(picked.shape, dtype)
            out[...] = picked
            return out

        if part is None:
            shard = lambda index: float_shard(index, dtype)  # noqa: E731
        elif qmod.scheme.stored:
            if not hasattr(source, "read_quantized_into"):
                raise ValueError(f"{name}: the model declares the checkpoint's {qmod.scheme.describe()} weights, but "
                                 f"the weight source {type(source).__name__} serves no quantized tensors")
            shard = stored_shard
        else:
            shard = quantized_shard
        return _assemble(shape, model.par.named(mesh, axes), shard)

    values = {path: build(path, var) for path, var in _variables(state)}
    state = jax.tree_util.tree_map_with_path(lambda p, v: values.get(p, v), state)
    return nnx.merge(graphdef, state)


class StoredPart:
    """A quantized source's stored values, or per-element scales, of its quantized tensors, served as a source."""

    def __init__(self, source, part: str, dtype):
        self.source, self.part, self.dtype = source, part, np.dtype(dtype)

    def read_into(self, name, layer, index, out):
        return self.source.read_quantized_into(name, self.part, layer, index, out)

    def read(self, name, layer, index):
        shape = self.source.canonical[name][0]
        out = np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)], self.dtype)
        return self.read_into(name, layer, index, out)


def _assemble(shape, named_sharding, shard) -> jax.Array:
    """A global array from `shard(index)` blocks: each distinct block is read once, put on the devices that
    hold it, and dropped before the next is read, so host memory peaks near one block (not one block per
    local device, as `jax.make_array_from_callback` does). On CPU, `device_put` of an aligned block aliases it
    (no copy): the block becomes the buffer of every local device that holds it."""
    devices_by_index: dict[tuple, list] = {}
    for device, index in named_sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in index)
        devices_by_index.setdefault(key, []).append((device, index))
    arrays = []
    for placements in devices_by_index.values():
        block = shard(placements[0][1])
        arrays += [jax.device_put(block, device) for device, _ in placements]
        jax.block_until_ready(arrays[-1])  # copied (or aliased): the block can go
        del block
    return jax.make_array_from_single_device_arrays(shape, named_sharding, arrays)


def _aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros whose data starts on a `_ALIGN`-byte boundary: XLA:CPU's `device_put` aliases such an array instead
    of copying it (numpy's own large arrays start 16 bytes into their pages, and are copied)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


_ALIGN = 64


def _clip(index: slice, stored: int, size: int, repeated: bool):
    """(the part of a stored-dim slice inside the checkpoint's `size`, its length), or None if empty.

    A dim whose kv heads are repeated (`repeated`) is mapped by `_read_kv`, not clipped.
    """
    start, stop, step = index.indices(stored)
    assert step == 1, index
    if repeated or stored == size:
        return slice(start, stop), stop - start
    stop = min(stop, size)
    return (slice(start, stop), stop - start) if stop > start else None


def _canonical(path) -> tuple[str, str | None]:
    """A parameter's state path -> (canonical name, the layer stack it is stacked over, or None).

    `layers.attn.wq` -> ("attn.wq", "layers"); `dense_layers.mlp.wg` -> ("mlp.wg", "dense_layers");
    `embed` -> ("embed", None).
    """
    keys = [str(p.key) for p in path[:-1] if hasattr(p, "key")]
    if keys[0] in STACKS:
        return ".".join(keys[1:]), keys[0]
    return ".".join(keys), None


STACKS = ("dense_layers", "layers")  # `moejax.model.transformer.Geometry.stacks` names


def _module_at(model, path):
    """The module whose parameter `path` (a quantized weight's values or scale) belongs to: the `Quantized`."""
    node = model
    for key in [str(p.key) for p in path[:-1] if hasattr(p, "key")][:-1]:
        node = getattr(node, key)
    return node


def _variables(state):
    """(path, Variable) pairs of an nnx State, path ending at the variable's `.value`."""
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = state
        for key in path[:-1]:
            node = node[key.key]
        yield path, node


def _read_kv(source, name, layer, index, axes, kv_repeat, out) -> None:
    """Fill `out` with a slice, mapping stored kv heads back to the checkpoint's when they are repeated.

    Straight into `out` when the source can (`read_into`: no temporary the size of the block)."""
    if kv_repeat == 1 or "kv_heads" not in axes:
        if hasattr(source, "read_into"):
            source.read_into(name, layer, tuple(index), out)
        else:
            out[...] = source.read(name, layer, tuple(index))
        return
    d = list(axes).index("kv_heads")
    stored = range(*index[d].indices(10**9))
    wanted = sorted({k // kv_repeat for k in stored})
    full = list(index)
    full[d] = slice(wanted[0], wanted[-1] + 1)
    block = source.read(name, layer, tuple(full))
    out[...] = np.take(block, [k // kv_repeat - wanted[0] for k in stored], axis=d)


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
        return (_std(self.cfg, name, self.scale) * rng.standard_normal(shape)).astype(np.float32)


def _std(cfg: ModelConfig, name: str, scale: float = 1.0) -> float:
    """Random weights' standard deviation: 1 / sqrt(fan-in), so activations keep their scale through the layers."""
    fan_in = {"embed": 1, "attn.wo": cfg.num_heads * cfg.value_head_dim, "moe.wd": cfg.moe_intermediate_size,
              "moe.shared_wd": cfg.shared_expert_intermediate_size, "mlp.wd": cfg.dense_intermediate_size,
              "attn.wq_b": cfg.q_lora_rank, "attn.wkv_b": cfg.kv_lora_rank}.get(name, cfg.hidden_size)
    return scale / math.sqrt(max(1, fan_in))


class DeviceRandomSource:
    """Random weights drawn on the devices themselves, each array straight into its sharding (no host copy).

    For benchmarks of real model sizes (`moejax bench gpu`), where `RandomSource`'s host generator would take
    minutes (minutes of numpy for a 30B-parameter model). Same distributions as `RandomSource` (norms around 1,
    other weights with std 1 / sqrt(fan-in)), not the same values. Dims stored larger than the checkpoint's
    (vocabulary and FFN padding) and padding layers are zero, as `place` makes them, so padded vocabulary ids are
    never produced; repeated kv heads (fewer kv heads than `tensor`) get independent values: timing only.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, scale: float = 1.0):
        self.cfg, self.seed, self.scale = cfg, seed, scale

    def place(self, model: Transformer, mesh: jax.sharding.Mesh) -> Transformer:
        if model.quantization:
            raise ValueError(f"random weights drawn on the devices are float; a {model.quantization}-quantized model "
                             f"places its weights from a host source (RandomSource, a checkpoint)")
        graphdef, state = nnx.split(model)
        canonical = canonical_shapes(self.cfg)
        paths, draws, shardings = [], [], []
        for path, var in _variables(state):
            name, stack = _canonical(path)
            stacked = stack is not None
            value = var.get_value()
            if stacked:
                live = np.zeros(value.shape[0], bool)
                live[list(model.geometry.stack(stack).slot_of_layer().values())] = True
            paths.append(path)
            draws.append(functools.partial(
                _draw, shape=tuple(value.shape), dtype=value.dtype,
                limit=((len(live),) if stacked else ()) + canonical[name][0], live=tuple(live) if stacked else None,
                norm=name.endswith("norm"), std=_std(self.cfg, name, self.scale)))
            shardings.append(model.par.named(mesh, var.get_metadata()["out_sharding"]))

        def make(key):  # one program for every weight: one compile, each output made in its sharding
            return [draw(jax.random.fold_in(key, i)) for i, draw in enumerate(draws)]

        arrays = jax.jit(make, out_shardings=shardings)(jax.random.key(self.seed))
        values = dict(zip(paths, arrays, strict=True))
        state = jax.tree_util.tree_map_with_path(lambda p, v: values.get(p, v), state)
        return nnx.merge(graphdef, state)


def _draw(key, *, shape, dtype, limit, live, norm, std):
    x = jax.random.normal(key, shape, jnp.float32)
    x = 1.0 + 0.1 * x if norm else std * x
    for d, size in enumerate(limit):  # zero beyond the checkpoint's sizes (padding)
        if size < shape[d]:
            x = jnp.where(jax.lax.broadcasted_iota(jnp.int32, shape, d) < size, x, 0.0)
    if live is not None and not all(live):  # padding layers: zero
        x = jnp.where(jnp.asarray(live).reshape((-1,) + (1,) * (len(shape) - 1)), x, 0.0)
    return x.astype(dtype)
