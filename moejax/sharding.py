"""The one table that maps logical dimension names to mesh axes, and helpers derived from it.

Model code names logical dims only (`batch`, `heads`, `experts`, ...). This module turns them into
`PartitionSpec`s for weights, activations and the KV cache, and, inside `jax.shard_map` bodies,
into the mesh axes that collectives reduce over (`psum(x, "heads")` sums over whatever mesh axes
split the heads). Changing where a dim lives is a one-line change here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# logical dim -> mesh axes that split it (empty: replicated)
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

Axes = Sequence[str | None]


def mesh_axes(*logical: str) -> tuple[str, ...]:
    """Mesh axes that split the given logical dims, in rule order, without repeats."""
    out: list[str] = []
    for name in logical:
        if name not in RULES:
            raise KeyError(f"unknown logical dim {name!r}; known: {sorted(RULES)}")
        out += [a for a in RULES[name] if a not in out]
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


def psum(x, *logical: str):
    """Sum partial results over the mesh axes that split `logical` (no-op when none do)."""
    axes = mesh_axes(*logical)
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
