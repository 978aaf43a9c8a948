"""The one table that maps logical dimension names to mesh axes, and helpers derived from it.

Model code names logical dims only (`batch`, `heads`, `experts`, ...). This module turns them into
`PartitionSpec`s for weights, activations and the KV cache, and, inside `jax.shard_map` bodies,
into the mesh axes that collectives reduce over (`psum(x, "heads")` sums over whatever mesh axes
split the heads). Changing where a dim lives is a one-line change here.

The expert axis runs in one of two modes (`EP_ATTENTION_MODES`, the name the planner and the sweep
share), each one rules table:

- ``"data"`` (the default): outside the MoE blocks the expert axis is one more data-parallel axis:
  requests (batch rows) and KV pages are split over data x expert, attention weights replicated
  over `expert`; each MoE layer sends every (token, expert) pair to the shard holding its expert
  and back (all-to-all, `moejax.model.moe`). The shared expert is split over `tensor` only.
- ``"replicated"``: tokens are replicated over the expert axis; each shard computes its experts'
  pairs and one all-reduce combines them. The shared expert is split over tensor x expert.

The active table is set with `use(mode)` around tracing and placement (`moejax.steps` and
`moejax.inference` do it); model code only asks `tokens_split_over_experts()`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

EP_ATTENTION_MODES = ("data", "replicated")

# logical dim -> mesh axes that split it (empty: replicated); the "replicated" expert mode
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data",),
    "seq": (),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "ffn": ("tensor",),
    "shared_ffn": ("tensor", "expert"),  # the shared expert: computed once, split over the expert group too
    "experts": ("expert",),
    "experts_all": (),  # router output: every device scores every expert
    "vocab": ("tensor",),
    "layers": ("stage",),
    "cache_pages": ("data",),
    "page_slot": (),
    "pages_per_seq": (),
}

_RULES_BY_MODE = {
    "replicated": RULES,
    "data": {**RULES, "batch": ("data", "expert"), "cache_pages": ("data", "expert"), "shared_ffn": ("tensor",)},
}
_ACTIVE: contextvars.ContextVar[dict[str, tuple[str, ...]]] = contextvars.ContextVar("rules", default=RULES)

Axes = Sequence[str | None]


def check_mode(ep_attention: str) -> str:
    if ep_attention not in EP_ATTENTION_MODES:
        raise ValueError(f"ep_attention must be one of {EP_ATTENTION_MODES}, got {ep_attention!r}")
    return ep_attention


@contextlib.contextmanager
def use(ep_attention: str):
    """Make the rules table of expert mode `ep_attention` the active one inside the block."""
    token = _ACTIVE.set(_RULES_BY_MODE[check_mode(ep_attention)])
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def tokens_split_over_experts() -> bool:
    """Inside a shard_map body: True when the devices of an expert group hold different tokens (the "data"
    mode on an expert axis of more than one device)."""
    return bool(set(mesh_axes("batch")) & set(_split("experts")))


def mesh_axes(*logical: str) -> tuple[str, ...]:
    """Mesh axes that split the given logical dims, in rule order, without repeats."""
    rules = _ACTIVE.get()
    out: list[str] = []
    for name in logical:
        if name not in rules:
            raise KeyError(f"unknown logical dim {name!r}; known: {sorted(rules)}")
        out += [a for a in rules[name] if a not in out]
    return tuple(out)


def spec(axes: Axes) -> P:
    """PartitionSpec for an array whose dims carry these logical names (None: replicated dim).

    Raises if two dims of one array would land on the same mesh axis.
    """
    used: dict[str, str] = {}
    parts = []
    for name in axes:
        if name is None:
            parts.append(None)
            continue
        mapped = mesh_axes(name)
        for axis in mapped:
            if axis in used:
                raise ValueError(f"logical dims {used[axis]!r} and {name!r} of one array both map to mesh "
                                 f"axis {axis!r} (axes {tuple(axes)})")
            used[axis] = name
        parts.append(mapped[0] if len(mapped) == 1 else (mapped or None))
    return P(*parts)


def named(mesh: jax.sharding.Mesh, axes: Axes) -> NamedSharding:
    return NamedSharding(mesh, spec(axes))


# ---- inside shard_map bodies -------------------------------------------------------------------


def _split(*logical: str) -> tuple[str, ...]:
    """Inside a shard_map body: the mesh axes of size > 1 that split `logical` (a size-1 axis moves nothing,
    and a collective over it would still be an instruction in the program)."""
    return tuple(a for a in mesh_axes(*logical) if jax.lax.axis_size(a) > 1)


def psum(x, *logical: str):
    """Sum partial results over the mesh axes that split `logical` (no-op when none do)."""
    axes = _split(*logical)
    return jax.lax.psum(x, axes) if axes else x


def axis_index(logical: str):
    """This shard's index along the mesh axes that split `logical` (0 when unsplit)."""
    axes = mesh_axes(logical)
    if not axes:
        return 0
    return jax.lax.axis_index(axes if len(axes) > 1 else axes[0])


def axis_size(mesh: jax.sharding.Mesh, logical: str) -> int:
    size = 1
    for axis in mesh_axes(logical):
        size *= mesh.shape[axis]
    return size


def ppermute(x, logical: str, perm: list[tuple[int, int]]):
    """Send x between shards along the mesh axis splitting `logical`; receivers not in perm get zeros."""
    axes = mesh_axes(logical)
    if not axes:
        return x
    return jax.lax.ppermute(x, axes if len(axes) > 1 else axes[0], perm)


def pmax(x, *logical: str):
    """Maximum over the mesh axes that split `logical` (no-op when none do)."""
    axes = _split(*logical)
    return jax.lax.pmax(x, axes) if axes else x


def all_to_all(x, logical: str):
    """Exchange chunks along the mesh axes splitting `logical`: x[j] goes to shard j; result[i] came from shard i.

    x: [shards, ...] with one chunk per shard of those axes.
    """
    axes = mesh_axes(logical)
    if not axes:
        return x
    return jax.lax.all_to_all(x, axes if len(axes) > 1 else axes[0], 0, 0, tiled=False)


def all_gather(x, logical: str):
    """Stack x from every shard along the mesh axes splitting `logical`: [shards, *x.shape]."""
    axes = mesh_axes(logical)
    if not axes:
        return x[None]
    return jax.lax.all_gather(x, axes if len(axes) > 1 else axes[0])


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, logical: str):
    """`jax.lax.ragged_all_to_all` over the mesh axes splitting `logical`."""
    axes = mesh_axes(logical)
    if not axes:
        raise ValueError(f"ragged_all_to_all over {logical!r}, which no mesh axis splits")
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axes if len(axes) > 1 else axes[0])
