"""Parallel layouts ('DP2TP2EP2PP1') and the device mesh over (data, tensor, expert, stage).

A `Layout` is pure data (four factors); `make_mesh` turns it into a `jax.sharding.Mesh` over the
first `layout.size` devices at hand, so a 1-device baseline runs on an 8-device host. Over several
processes (`moejax.distributed`) the devices are laid out so that `data` and `stage` cross hosts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import astuple, dataclass, fields

import jax

from moejax.axes import AXES
from moejax.config import ModelConfig
from moejax.distributed import device_grid, take_devices

_SHORT = {"DP": "data", "TP": "tensor", "EP": "expert", "PP": "stage"}
_LONG_TO_SHORT = {v: k for k, v in _SHORT.items()}
_SHORT_RE = re.compile(r"(DP|TP|EP|PP)(\d+)", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Layout:
    """How many devices each mesh axis spans. The product is the device count."""

    data: int = 1
    tensor: int = 1
    expert: int = 1
    stage: int = 1

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str | Layout) -> Layout:
        """Parse 'DP2TP2EP2PP1' (any order, missing factors 1) or 'data=2,tensor=2,expert=2,stage=1'."""
        if isinstance(text, Layout):
            return text
        s = text.strip().replace(" ", "")
        if not s:
            raise ValueError("empty layout string; expected e.g. 'DP2TP2EP2PP1' or 'data=2,tensor=2'")
        factors: dict[str, int] = {}
        if "=" in s:
            for part in s.split(","):
                name, _, value = part.partition("=")
                if name not in AXES or not value.isdigit():
                    raise ValueError(f"bad layout part {part!r} in {text!r}; expected axis=int with axis in {AXES}")
                _set_once(factors, name, int(value), text)
        else:
            pos = 0
            for m in _SHORT_RE.finditer(s):
                if m.start() != pos:
                    break
                _set_once(factors, _SHORT[m.group(1).upper()], int(m.group(2)), text)
                pos = m.end()
            if pos != len(s):
                raise ValueError(f"cannot parse layout {text!r} at {s[pos:]!r}; expected e.g. 'DP2TP2EP2PP1'")
        return cls(**factors)

    def __str__(self) -> str:
        parts = [f"{_LONG_TO_SHORT[a]}{getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
        return "".join(parts) or "DP1"

    @property
    def size(self) -> int:
        return self.data * self.tensor * self.expert * self.stage

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return astuple(self)

    def problems(self, cfg: ModelConfig) -> list[str]:
        """Every reason this layout cannot run `cfg`, each naming the numbers involved."""
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
    def enumerate(n_devices: int, model_config: ModelConfig | None = None) -> list[Layout]:
        """Every layout of exactly `n_devices` devices that is valid for `model_config` (all if None)."""
        if n_devices < 1:
            raise ValueError(f"n_devices must be at least 1, got {n_devices}")
        divs = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
        out = []
        for d, t, e in itertools.product(divs, divs, divs):
            if n_devices % (d * t * e):
                continue
            layout = Layout(d, t, e, n_devices // (d * t * e))
            if model_config is None or not layout.problems(model_config):
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
    """A mesh with axes (data, tensor, expert, stage) over the first `layout.size` devices.

    Axes are Explicit: arrays carry their sharding in their type, and collectives are written
    out inside `jax.shard_map` (see moejax.model).
    """
    layout = Layout.parse(layout)
    devices = list(jax.devices() if devices is None else devices)
    if layout.size > len(devices):
        raise ValueError(
            f"layout {layout} needs {layout.size} devices but only {len(devices)} are available "
            f"({devices[0].platform}); on CPU call moejax.cpu_devices({layout.size}) before JAX starts")
    # Device order: `tensor` varies fastest, then expert, stage, data, so tensor groups are neighbouring
    # devices (one NVLink domain on GPUs) and data groups the farthest apart (what the planner assumes).
    order = ("data", "stage", "expert", "tensor")
    axis_types = (jax.sharding.AxisType.Explicit,) * len(order)
    shape = tuple(getattr(layout, a) for a in order)
    if len({d.process_index for d in devices}) > 1:  # multi-host: data and stage across hosts by default
        # The same number from every process: a process holding none of the mesh could not run its programs.
        devices = take_devices(devices, layout.size)
        grid = device_grid(dict(zip(AXES, layout.shape, strict=True)), order, devices)
        return jax.sharding.Mesh(grid, order, axis_types=axis_types)
    return jax.make_mesh(shape, order, axis_types=axis_types, devices=devices[: layout.size])
