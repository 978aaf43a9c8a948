"""Parallel layouts ('DP2TP2EP2PP1', 'TP4MTP1EP8') and the device mesh over (data, tensor, expert, stage).

A `Layout` is pure data (the four factors, and the MoE's own tensor factor where it differs from attention's);
`make_mesh` turns it into a `jax.sharding.Mesh` over the first `layout.size` devices at hand, so a 1-device
baseline runs on an 8-device host. Over several processes (`moejax.distributed`) the devices are laid out so that
`data` and `stage` cross hosts.

A split layout (`TP{t}MTP{m}EP{e}`) runs attention as TP t x DP G / t and the MoE as TP m x EP e over the same
G = m x e devices of a group. Its mesh factors the group into four axes (`Layout.split_factors`,
`moejax.axes.SPLIT_AXES`), each splitting one attention dim and one MoE dim, so that every array keeps one
sharding and every collective runs over named axes: `tensor` = gcd(t, m), `tensor_expert` = t / gcd,
`data_tensor` = m / gcd, `expert` = e / tensor_expert. A runtime layout is the case tensor_expert =
data_tensor = 1, and its mesh has only the four axes.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, fields

import jax

from moejax.axes import AXES, MESH_ORDER, SPLIT_AXES
from moejax.config import ModelConfig
from moejax.distributed import device_grid, take_devices

_SHORT = {"DP": "data", "TP": "tensor", "EP": "expert", "PP": "stage", "MTP": "moe_tensor"}
_LONG_TO_SHORT = {v: k for k, v in _SHORT.items()}
_SHORT_RE = re.compile(r"(DP|MTP|TP|EP|PP)(\d+)", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Layout:
    """How many devices each mesh axis spans, and how the MoE splits them (see the module docstring).

    `tensor` and `expert` are attention's tensor parallelism and the MoE's expert parallelism. `moe_tensor` is the
    MoE's tensor parallelism (each expert's FFN width split) where it differs from attention's (a *split* layout,
    written `TP4MTP1EP8`); 0 means the same as `tensor` (the runtime's layouts: `TP2EP4`). Per stage and replica a
    group of G = moe_tensor x expert devices runs both: attention as TP `tensor` x data-parallel G / `tensor`, the
    MoE as TP `moe_tensor` x EP `expert` (vLLM's `--tensor-parallel-size 8 --enable-expert-parallel`, TensorRT-LLM's
    `tp 8, moe_tp 1, moe_ep 8`: `TP8MTP1EP8`).
    """

    data: int = 1
    tensor: int = 1
    expert: int = 1
    stage: int = 1
    moe_tensor: int = 0  # 0: the same as `tensor`

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < (0 if f.name == "moe_tensor" else 1):
                raise ValueError(f"Layout.{f.name} must be a positive integer, got {value!r}")
        if self.moe_tensor == self.tensor:
            object.__setattr__(self, "moe_tensor", 0)  # one spelling per layout: TP2MTP2EP2 is TP2EP2
        if (self.moe_tp * self.expert) % self.tensor:
            raise ValueError(f"layout {self}: MTP {self.moe_tp} x EP {self.expert} must be a multiple of TP "
                             f"{self.tensor} (attention splits the MoE group's devices into TP x DP)")

    @classmethod
    def parse(cls, text: str | Layout) -> Layout:
        """Parse 'DP2TP2EP2PP1' or 'TP4MTP1EP8' (any order, missing factors 1, MTP missing: the same as TP), or
        'data=2,tensor=2,expert=2,stage=1,moe_tensor=1'."""
        if isinstance(text, Layout):
            return text
        s = text.strip().replace(" ", "")
        if not s:
            raise ValueError("empty layout string; expected e.g. 'DP2TP2EP2PP1', 'TP4MTP1EP8' or 'data=2,tensor=2'")
        factors: dict[str, int] = {}
        if "=" in s:
            for part in s.split(","):
                name, _, value = part.partition("=")
                if name not in (*AXES, "moe_tensor") or not value.isdigit():
                    raise ValueError(f"bad layout part {part!r} in {text!r}; expected axis=int with axis in "
                                     f"{(*AXES, 'moe_tensor')}")
                _set_once(factors, name, int(value), text)
        else:
            pos = 0
            for m in _SHORT_RE.finditer(s):
                if m.start() != pos:
                    break
                _set_once(factors, _SHORT[m.group(1).upper()], int(m.group(2)), text)
                pos = m.end()
            if pos != len(s):
                raise ValueError(f"cannot parse layout {text!r} at {s[pos:]!r}; expected e.g. 'DP2TP2EP2PP1' or "
                                 f"'TP4MTP1EP8'")
        if factors.get("moe_tensor") == 0:
            raise ValueError(f"layout {text!r}: MTP must be a positive integer")
        return cls(**factors)

    def __str__(self) -> str:
        if self.split:
            parts = [("DP", self.data), ("TP", self.tensor), ("MTP", self.moe_tensor), ("EP", self.expert),
                     ("PP", self.stage)]
            return "".join(f"{k}{v}" for k, v in parts if v > 1 or k in ("TP", "MTP"))
        parts = [f"{_LONG_TO_SHORT[a]}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
        return "".join(parts) or "DP1"

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "moe_tensor" or self.split]
        return f"Layout({', '.join(parts)})"

    @property
    def split(self) -> bool:
        """True when the MoE's tensor parallelism differs from attention's (an `MTP` factor)."""
        return self.moe_tensor != 0

    @property
    def moe_tp(self) -> int:
        """The MoE's tensor parallelism (each expert's FFN width split over it)."""
        return self.moe_tensor or self.tensor

    @property
    def group(self) -> int:
        """Devices of one replica in one stage: MoE TP x EP (= attention TP x attention DP)."""
        return self.moe_tp * self.expert

    @property
    def attention_data(self) -> int:
        """Attention's data parallelism inside a group (the runtime's dp_attention mode: `expert`)."""
        return self.group // self.tensor

    @property
    def size(self) -> int:
        return self.data * self.group * self.stage

    @property
    def split_factors(self) -> tuple[int, int, int, int]:
        """The group's four mesh axes (`moejax.axes.SPLIT_AXES`): sizes of (tensor, tensor_expert, data_tensor,
        expert). tensor = gcd(TP, MTP) splits heads and FFN width alike; tensor_expert = TP / tensor, the rest of
        attention's TP, splits experts; data_tensor = MTP / tensor, the rest of the MoE's TP, splits requests;
        expert = EP / tensor_expert. A runtime layout is (TP, 1, 1, EP)."""
        x = math.gcd(self.tensor, self.moe_tp)
        y, z = self.tensor // x, self.moe_tp // x
        return x, y, z, self.expert // y

    def mesh_sizes(self) -> dict[str, int]:
        """Mesh axis -> size, in mesh order (`moejax.axes.MESH_ORDER`); a split layout adds the `SPLIT_AXES`."""
        x, y, z, w = self.split_factors
        sizes = {"data": self.data, "stage": self.stage, "expert": w, "data_tensor": z, "tensor_expert": y,
                 "tensor": x}
        return {a: sizes[a] for a in MESH_ORDER if self.split or a not in SPLIT_AXES}

    def axis_size(self, axis: str) -> int:
        """Devices along mesh axis `axis` (1 for an axis this layout's mesh does not have)."""
        return self.mesh_sizes().get(axis, 1)

    def problems(self, cfg: ModelConfig) -> list[str]:
        """Every reason this layout cannot run `cfg`, each naming the numbers involved (the planner's rules too)."""
        out = []
        t, e, s = self.tensor, self.expert, self.stage
        if cfg.num_heads % t:
            out.append(f"Total number of attention heads ({cfg.num_heads}) must be divisible by tensor ({t})")
        k = cfg.num_kv_heads
        if (k >= t and k % t) or (k < t and t % k):
            out.append(f"kv heads ({k}) must divide or be divisible by tensor ({t}) "
                       f"(fewer kv heads than tensor are replicated)")
        # Vocabulary and FFN widths (routed, shared, dense) need no divisibility: the model pads them per shard (exact).
        if cfg.num_experts % e:
            out.append(f"num_experts ({cfg.num_experts}) must be divisible by expert ({e})")
        if s > cfg.num_layers:
            out.append(f"stage ({s}) cannot exceed the number of layers ({cfg.num_layers})")
        return out

    def validate(self, cfg: ModelConfig) -> Layout:
        problems = self.problems(cfg)
        if problems:
            raise ValueError(f"layout {self} cannot run model {cfg.name or cfg.family}: " + "; ".join(problems))
        return self

    @staticmethod
    def enumerate(n_devices: int, model_config: ModelConfig | None = None, split_moe: bool = False) -> list[Layout]:
        """Every layout of exactly `n_devices` devices that is valid for `model_config` (all if None); with
        `split_moe`, also those whose MoE tensor factor differs from attention's (`TP8MTP1EP8`)."""
        if n_devices < 1:
            raise ValueError(f"n_devices must be at least 1, got {n_devices}")
        divs = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
        out = []
        for d, s in itertools.product(divs, divs):
            if n_devices % (d * s):
                continue
            group = n_devices // (d * s)
            for t, mt in itertools.product(divs, (0, *divs) if split_moe else (0,)):
                if group % t or (mt and group % mt):
                    continue
                layout = Layout(d, t, group // (mt or t), s, mt)
                if (mt and not layout.split) or (model_config is not None and layout.problems(model_config)):
                    continue
                out.append(layout)
        return sorted(out)

    def kv_heads_per_model(self, cfg: ModelConfig) -> int:
        """KV heads stored by the sharded model: kv heads fewer than `tensor` are replicated up to `tensor`."""
        return max(cfg.num_kv_heads, self.tensor)

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers per stage: contiguous groups whose sizes differ by at most one, larger groups first."""
        base, rem = divmod(num_layers, self.stage)
        return [base + (1 if s < rem else 0) for s in range(self.stage)]


def _set_once(factors: dict[str, int], axis: str, value: int, text: str) -> None:
    if axis in factors:
        raise ValueError(f"axis {axis!r} given twice in layout {text!r}")
    factors[axis] = value


def make_mesh(layout: Layout | str, devices: list | None = None) -> jax.sharding.Mesh:
    """A mesh over the first `layout.size` devices: axes (data, stage, expert, tensor), plus `data_tensor` and
    `tensor_expert` for a split layout (`Layout.mesh_sizes`).

    Axes are Explicit: arrays carry their sharding in their type, and collectives are written
    out inside `jax.shard_map` (see moejax.model).
    """
    layout = Layout.parse(layout)
    devices = list(jax.devices() if devices is None else devices)
    if layout.size > len(devices):
        raise ValueError(
            f"layout {layout} needs {layout.size} devices but only {len(devices)} are available "
            f"({devices[0].platform}); on CPU call moejax.cpu_devices({layout.size}) before JAX starts")
    # Device order (`MESH_ORDER`): `tensor` varies fastest, so tensor groups are neighbouring devices (one NVLink
    # domain on GPUs) and data groups the farthest apart (what the planner assumes).
    sizes = layout.mesh_sizes()
    order = tuple(sizes)
    axis_types = (jax.sharding.AxisType.Explicit,) * len(order)
    if len({d.process_index for d in devices}) > 1:  # multi-host: data and stage across hosts by default
        # The same number from every process: a process holding none of the mesh could not run its programs.
        devices = take_devices(devices, layout.size)
        grid = device_grid(sizes, order, devices)
        return jax.sharding.Mesh(grid, order, axis_types=axis_types)
    return jax.make_mesh(tuple(sizes.values()), order, axis_types=axis_types, devices=devices[: layout.size])
