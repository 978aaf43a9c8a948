"""How a model is split over the mesh: the rules tables (logical dim -> mesh axes) and `Parallelism`, the one
frozen value that carries every parallel choice of a placed model.

Model code names logical dims only (`batch`, `heads`, `experts`, ...). A `Parallelism` (layout, expert mode, MoE
dispatch strategy, token exchange) is built once per model (`Parallelism.checked`), stored on the model's modules
at construction, and turns logical names into `PartitionSpec`s for weights, activations and the KV cache, and,
inside `jax.shard_map` bodies, into the mesh axes that collectives run over (`par.psum(x, "heads")` sums over
whatever mesh axes split the heads). Changing where a dim lives is a one-line change in a table here.

A mesh axis of size 1 splits nothing, so it is left out of every spec and every collective: an array is never typed
as varying over it, and `jax.shard_map`'s replication check (`check_vma`, on everywhere but the Pallas
interpret-mode programs of `manual.checks_replication`) holds without a collective over a single device (XLA:CPU
keeps an all-reduce over one-device groups as an instruction).

The expert axis runs in one of two modes (`EXPERT_MODES`, the names the runtime, the planner and the sweep share),
each one rules table:

- ``"dp_attention"`` (the default): outside the MoE blocks the expert axis is one more data-parallel axis:
  requests (batch rows) and KV pages are split over data x expert, attention weights replicated over `expert`;
  each MoE layer sends every (token, expert shard) unit to the shard holding its experts and back (all-to-all,
  `moejax.model.moe`). The shared expert is split over `tensor` only.
- ``"replicated_attention"``: tokens (and attention) are replicated over the expert axis; each shard computes its
  experts' pairs and one all-reduce combines them. The shared expert is split over tensor x expert.

The names before this one, ``"data"`` and ``"replicated"`` (and the keyword ``ep_attention``), are accepted for one
release with a `DeprecationWarning` (`expert_mode_of`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import native
from moejax.axes import DEPRECATED_EXPERT_MODES, EXPERT_MODES
from moejax.mesh import Layout

MOE_STRATEGIES = ("auto", "loop", "gather", "blocks", "ragged", "native", "pallas")  # `moejax.model.moe`
EXCHANGES = ("auto", "all_to_all", "ragged_all_to_all")  # the dp_attention mode's token exchange

# logical dim -> mesh axes that split it (empty: replicated); the "replicated_attention" expert mode
_REPLICATED: dict[str, tuple[str, ...]] = {
    "batch": ("data",),
    "seq": (),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "latent": (),  # MLA's compressed widths (q and kv latents, the cached latent): shared by every head
    "ffn": ("tensor",),
    "shared_ffn": ("tensor", "expert"),  # the shared expert and dense FFN layers: split over the expert group too
    "experts": ("expert",),
    "experts_all": (),  # router output: every device scores every expert
    "vocab": ("tensor",),
    "layers": ("stage",),
    "cache_pages": ("data",),
    "page_slot": (),
    "pages_per_seq": (),
}
# The dp_attention mode. A split layout's two extra axes (`moejax.axes.SPLIT_AXES`, size 1 and so absent otherwise)
# each split one attention dim and one MoE dim: `tensor_expert` heads and experts, `data_tensor` requests and FFN width.
_DP_ATTENTION: dict[str, tuple[str, ...]] = {
    **_REPLICATED,
    "batch": ("data", "data_tensor", "expert"),
    "cache_pages": ("data", "data_tensor", "expert"),
    "heads": ("tensor", "tensor_expert"),
    "kv_heads": ("tensor", "tensor_expert"),
    "ffn": ("tensor", "data_tensor"),
    "shared_ffn": ("tensor", "tensor_expert"),  # attention's tensor split: the shared expert runs on its tokens
    "experts": ("tensor_expert", "expert"),
    "vocab": ("tensor", "tensor_expert"),
}
RULES: dict[str, dict[str, tuple[str, ...]]] = {"replicated_attention": _REPLICATED, "dp_attention": _DP_ATTENTION}

Axes = Sequence[str | None]


def expert_mode_of(mode: str | None = None, ep_attention: str | None = None) -> str:
    """The expert mode named by `mode`, or by the deprecated keyword `ep_attention` (and the deprecated values
    "data" / "replicated"), with a `DeprecationWarning` for the old names; ValueError for anything else."""
    if ep_attention is not None:
        if mode is not None and expert_mode_of(mode) != expert_mode_of(ep_attention):
            raise ValueError(f"expert_mode={mode!r} and the deprecated ep_attention={ep_attention!r} disagree; "
                             f"give expert_mode only")
        warnings.warn("ep_attention is deprecated: use expert_mode ('dp_attention' or 'replicated_attention')",
                      DeprecationWarning, stacklevel=3)
        mode = ep_attention
    mode = EXPERT_MODES[0] if mode is None else mode
    if mode in DEPRECATED_EXPERT_MODES:
        warnings.warn(f"expert mode {mode!r} is deprecated: use {DEPRECATED_EXPERT_MODES[mode]!r}",
                      DeprecationWarning, stacklevel=3)
        return DEPRECATED_EXPERT_MODES[mode]
    if mode not in EXPERT_MODES:
        raise ValueError(f"expert_mode must be one of {EXPERT_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Parallelism:
    """Every parallel choice of a placed model, fixed once: the layout (mesh axis sizes), the expert mode, the MoE
    dispatch strategy and the token exchange. Hashable, so modules keep it as static data.

    Outside shard_map: `spec` / `named` give the sharding of an array with logical axes. Inside shard_map
    bodies: `psum`, `pmax`, `axis_index`, `ppermute`, `all_to_all`, `all_gather`, `ragged_all_to_all` and `vary`
    run over the mesh axes (of size > 1) that split a logical dim.
    """

    layout: Layout = Layout()
    expert_mode: str = EXPERT_MODES[0]
    moe_strategy: str = "auto"
    exchange: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layout", Layout.parse(self.layout))
        if self.expert_mode not in EXPERT_MODES:
            raise ValueError(f"expert_mode must be one of {EXPERT_MODES}, got {self.expert_mode!r}")
        if self.moe_strategy not in MOE_STRATEGIES:
            raise ValueError(f"unknown MoE dispatch strategy {self.moe_strategy!r}; choose from {MOE_STRATEGIES}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown MoE token exchange {self.exchange!r}; choose from {EXCHANGES}")
        if self.layout.split and self.expert_mode != "dp_attention":
            raise ValueError(f"layout {self.layout} splits the MoE apart from attention, which runs data-parallel "
                             f"inside the group (expert mode 'dp_attention'); expert mode {self.expert_mode!r} "
                             f"replicates attention over the expert axis: use 'dp_attention' or a layout without MTP")

    def replace(self, **changes) -> Parallelism:
        return replace(self, **changes)

    def checked(self, platform: str) -> Parallelism:
        """Raise ValueError (on the host, before any compilation) for a choice `platform` cannot run."""
        if self.exchange == "ragged_all_to_all" and platform == "cpu":
            raise ValueError("exchange 'ragged_all_to_all' needs a backend with the ragged-all-to-all collective; "
                             "XLA:CPU has none: use exchange 'all_to_all' (exact, fixed capacity) on CPU")
        if self.moe_strategy == "native" and (platform != "cpu" or not native.available()):
            why = (f"the backend is {platform!r}" if platform != "cpu" else native.unavailable_reason()
                   or f"switched off ({native.ENV}=0)")
            raise ValueError(f"MoE dispatch 'native' needs moejax's CPU kernels, but {why}; "
                             "use dispatch 'auto' (it picks 'native' where it can run) or 'loop'")
        return self

    # ---- the rules ------------------------------------------------------------------------------

    def mesh_axes(self, *logical: str) -> tuple[str, ...]:
        """Mesh axes of size > 1 that split the given logical dims, in rule order, without repeats."""
        rules = RULES[self.expert_mode]
        out: list[str] = []
        for name in logical:
            if name not in rules:
                raise KeyError(f"unknown logical dim {name!r}; known: {sorted(rules)}")
            out += [a for a in rules[name] if a not in out and self.layout.axis_size(a) > 1]
        return tuple(out)

    def size(self, *logical: str) -> int:
        """Shards the given logical dims are split into (the product of their mesh axes' sizes)."""
        n = 1
        for axis in self.mesh_axes(*logical):
            n *= self.layout.axis_size(axis)
        return n

    # ---- the MoE block's collectives, chosen here once (`moejax.model.moe.MoE`; the planner counts the same) ----
    #
    # Tokens reach the MoE in attention's split (requests over `batch`'s axes, replicated over `heads`'). In order:
    # 1. gather: over the axes splitting both requests and the FFN width (`data_tensor`), all-gather the tokens:
    #    each device then runs its FFN slice on the whole MoE-TP group's tokens;
    # 2. exchange: if an expert axis still splits the tokens (`expert` in dp_attention), all-to-all over every
    #    expert axis; the expert axes attention replicated the tokens over (`tensor_expert`) first take one slice
    #    of them each (`slice_axes`), so each token is sent once. Otherwise each device picks its own experts'
    #    (token, expert) pairs with no exchange;
    # 3. scatter: reduce-scatter the gathered tokens' partial outputs back to their home (over the gather axes);
    # 4. reduce: one all-reduce over the rest of the FFN width's and experts' axes (`reduce_axes`), which also
    #    finishes the shared expert (split over attention's tensor axes).

    @property
    def gather_axes(self) -> tuple[str, ...]:
        """Mesh axes splitting both the requests and each expert's FFN width: tokens are all-gathered over them."""
        batch = self.mesh_axes("batch")
        return tuple(a for a in self.mesh_axes("ffn") if a in batch)

    @property
    def exchange_axes(self) -> tuple[str, ...]:
        """Mesh axes of the MoE's all-to-all: every expert axis where one of them splits the (gathered) tokens."""
        tokens = set(self.mesh_axes("batch")) - set(self.gather_axes)
        experts = self.mesh_axes("experts")
        return experts if tokens & set(experts) else ()

    @property
    def slice_axes(self) -> tuple[str, ...]:
        """Exchange axes the tokens are replicated over: each device sends only its slice of the tokens."""
        batch = self.mesh_axes("batch")
        return tuple(a for a in self.exchange_axes if a not in batch)

    @property
    def reduce_axes(self) -> tuple[str, ...]:
        """Mesh axes of the MoE block's closing all-reduce: FFN-width axes not gathered over, and expert axes that
        do not split the requests (partial sums of their experts, or of the exchange's token slices)."""
        batch, gather = self.mesh_axes("batch"), self.gather_axes
        return (tuple(a for a in self.mesh_axes("ffn") if a not in gather)
                + tuple(a for a in self.mesh_axes("experts") if a not in batch))

    @property
    def tokens_split_over_experts(self) -> bool:
        """True when the MoE layers exchange tokens (`exchange_axes`)."""
        return bool(self.exchange_axes)

    @property
    def batch_shards(self) -> int:
        """Groups the requests are split into: `data`, times `expert` in the dp_attention mode."""
        return self.size("batch")

    def spec(self, axes: Axes) -> P:
        """PartitionSpec for an array whose dims carry these logical names (None: replicated dim).

        Raises if two dims of one array would land on the same mesh axis.
        """
        used: dict[str, str] = {}
        parts = []
        for name in axes:
            if name is None:
                parts.append(None)
                continue
            mapped = self.mesh_axes(name)
            for axis in mapped:
                if axis in used:
                    raise ValueError(f"logical dims {used[axis]!r} and {name!r} of one array both map to mesh "
                                     f"axis {axis!r} (axes {tuple(axes)})")
                used[axis] = name
            parts.append(mapped[0] if len(mapped) == 1 else (mapped or None))
        return P(*parts)

    def named(self, mesh: jax.sharding.Mesh, axes: Axes) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes))

    # ---- inside shard_map bodies ---------------------------------------------------------------

    def psum(self, x, *logical: str):
        """Sum partial results over the mesh axes that split `logical` (no-op when none do)."""
        axes = self.mesh_axes(*logical)
        return jax.lax.psum(x, axes) if axes else x

    def pmax(self, x, *logical: str):
        """Maximum over the mesh axes that split `logical` (no-op when none do)."""
        axes = self.mesh_axes(*logical)
        return jax.lax.pmax(x, axes) if axes else x

    def vary(self, x, *logical: str):
        """x typed as varying over the mesh axes that split `logical` (no data moves): for a loop carry or a
        branch output that the other side makes differ per shard (`check_vma`)."""
        axes = tuple(a for a in self.mesh_axes(*logical) if a not in jax.typeof(x).mat.varying)
        return jax.lax.pcast(x, axes, to="varying") if axes else x

    def axis_index(self, logical: str):
        """This shard's index along the mesh axes that split `logical` (0 when unsplit)."""
        axes = self.mesh_axes(logical)
        return jax.lax.axis_index(_one(axes)) if axes else 0

    def ppermute(self, x, logical: str, perm: list[tuple[int, int]]):
        """Send x between shards along the mesh axes splitting `logical`; receivers not in perm get zeros."""
        axes = self.mesh_axes(logical)
        return jax.lax.ppermute(x, _one(axes), perm) if axes else x

    def all_to_all(self, x, logical: str):
        """Exchange chunks along the mesh axes splitting `logical`: x[j] goes to shard j; result[i] came from
        shard i. x: [shards, ...] with one chunk per shard of those axes."""
        axes = self.mesh_axes(logical)
        return jax.lax.all_to_all(x, _one(axes), 0, 0, tiled=False) if axes else x

    def all_gather(self, x, logical: str):
        """Stack x from every shard along the mesh axes splitting `logical`: [shards, *x.shape]."""
        axes = self.mesh_axes(logical)
        return jax.lax.all_gather(x, _one(axes)) if axes else x[None]

    def gather_tokens(self, x):
        """x [M, ...] of every device over `gather_axes`, concatenated in device order: [shards x M, ...]."""
        axes = self.gather_axes
        return jax.lax.all_gather(x, _one(axes), tiled=True) if axes else x

    def scatter_tokens(self, x):
        """Sum x [shards x M, ...] over `gather_axes` and keep this device's M rows (`gather_tokens` undone)."""
        axes = self.gather_axes
        return jax.lax.psum_scatter(x, _one(axes), tiled=True) if axes else x

    def slice_of(self) -> tuple:
        """(index, count) of this device's slice of rows cut over `slice_axes` ((0, 1) when none)."""
        axes = self.slice_axes
        count = 1
        for a in axes:
            count *= self.layout.axis_size(a)
        return (jax.lax.axis_index(_one(axes)) if axes else 0), count

    def reduce_moe(self, x):
        """The MoE block's closing all-reduce over `reduce_axes` (no-op when none)."""
        axes = self.reduce_axes
        return jax.lax.psum(x, axes) if axes else x

    def ragged_all_to_all(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                          logical: str):
        """`jax.lax.ragged_all_to_all` over the mesh axes splitting `logical`."""
        axes = self.mesh_axes(logical)
        if not axes:
            raise ValueError(f"ragged_all_to_all over {logical!r}, which no mesh axis splits")
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=_one(axes))


def _one(axes: tuple[str, ...]):
    """A collective's axis name: the axis itself, or the tuple when several split the dim."""
    return axes[0] if len(axes) == 1 else axes
