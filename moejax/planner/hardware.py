"""Accelerator descriptions for the planner: peak rates, memory, links, and efficiency factors.

Every figure is per device and comes from a YAML file in `configs/hardware/` that cites its source. Peak
FLOP/s are *dense* (vendor sheets often print 2:4-sparse figures, twice as large). Link bandwidths are per
device and per direction.

Efficiency curves turn peaks into what kernels achieve, per operation class and shape (the formulas are in
`moejax.planner.cost`). They are the free parameters of the cost model, and what `moejax.planner.calibrate`
fits (by gradient descent, all at once):

- `compute`, `compute_rows`: dense GEMM at m rows reaches compute x m / (m + compute_rows) of peak FLOP/s.
- `grouped`, `grouped_rows`, `grouped_width`: grouped expert GEMM at r tokens per expert, f expert width per device
  reaches grouped x r / (r + grouped_rows) x f / (f + grouped_width) (many narrow experts run worse).
- `narrow`, `narrow_grouped`: factors on `compute` and `grouped` for fp8/fp4 GEMMs (narrow formats reach a
  smaller fraction of their larger peak; grouped fp8 GEMMs of many small experts gain little over bf16).
- `memory`, `memory_bytes`: streaming a weight matrix of b bytes reaches memory x b / (b + memory_bytes) of
  peak bandwidth (many small experts stream worse than a few large ones).
- `routing_skew`: routers are not uniform; the busiest of EP expert ranks, each holding E / EP experts, gets
  1 + routing_skew x sqrt(2 ln EP / (E / EP)) times the mean tokens (the largest of EP sums of E / EP random
  expert loads; its grouped GEMMs and its all-to-all traffic grow by that factor).
- `attention`, `attention_context`: attention FLOPs over c cached positions per token reach
  attention x c / (c + attention_context) of bf16 peak; `attention_memory`, `attention_bytes`: KV
  reads of k bytes per layer reach attention_memory x k / (k + attention_bytes) of bandwidth (batch x context).
- `network`, `network_bytes`: a collective message of s bytes reaches network x s / (s + network_bytes) of link
  bandwidth; `collective_s`: fixed time per collective (launch, synchronisation) on top of link latency.
- `kernel_s`: launch and tail time per kernel (kernels per layer are counted in `moejax.planner.cost`).
- `step_overhead_s`: fixed time per engine step (scheduling, sampling, host work).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moejax.config import configs_dir

# Weight formats, widest first; then the runtime's weight-only post-training formats (`moejax.quant`: values
# dequantized into bf16 matmuls, so they compute at the bf16 peak).
WEIGHT_ONLY = ("int8", "int4")
PRECISIONS = ("fp32", "bf16", "fp8", "fp4") + WEIGHT_ONLY + ("mxfp4",)  # mxfp4: gpt-oss's published experts


@dataclass(frozen=True)
class Efficiency:
    """Efficiency curves (see module docstring). Fractions lie in (0, 1.5]; sizes, rows and times are >= 0."""

    compute: float = 0.75
    compute_rows: float = 64.0
    grouped: float = 0.6
    grouped_rows: float = 64.0
    grouped_width: float = 1024.0
    narrow: float = 0.8
    narrow_grouped: float = 0.6
    memory: float = 0.85
    memory_bytes: float = 1.0e6
    routing_skew: float = 0.1
    attention: float = 0.5
    attention_context: float = 256.0
    attention_memory: float = 0.8
    attention_bytes: float = 1.0e6
    network: float = 0.7
    network_bytes: float = 2.0e5
    collective_s: float = 1.0e-5
    kernel_s: float = 3.0e-6
    step_overhead_s: float = 2.0e-4

    def __post_init__(self):
        for name, value in self.as_dict().items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Efficiency.{name} must be a finite number >= 0, got {value!r}")
            if name in FRACTIONS and not 0 < value <= 1.5:
                raise ValueError(f"Efficiency.{name} must lie in (0, 1.5], got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


FRACTIONS = ("compute", "grouped", "narrow", "narrow_grouped", "memory", "attention", "attention_memory", "network")


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and the fabric around it. All rates are per device; bandwidths per direction."""

    name: str
    peak_flops: dict[str, float]  # dense FLOP/s by compute precision
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s within the NVLink (scale-up) domain
    nvlink_latency_s: float  # per collective step within the domain
    network_bandwidth: float  # bytes/s across domains (scale-out NIC per device)
    network_latency_s: float
    devices_per_node: int
    nvlink_domain: int  # devices that share the NVLink domain (8 for HGX, 72 for GB200 NVL72)
    reserved_memory_bytes: float = 0.0  # runtime, collectives buffers, fragmentation
    efficiency: Efficiency = field(default_factory=Efficiency)

    def __post_init__(self):
        unknown = set(self.peak_flops) - set(PRECISIONS)
        if unknown:
            raise ValueError(f"{self.name}: unknown precisions {sorted(unknown)} in peak_flops; known {PRECISIONS}")
        if "bf16" not in self.peak_flops:
            raise ValueError(f"{self.name}: peak_flops must give at least bf16")
        if self.nvlink_domain < 1 or self.devices_per_node < 1:
            raise ValueError(f"{self.name}: nvlink_domain and devices_per_node must be >= 1")
        rates = {f"peak_flops[{k}]": v for k, v in self.peak_flops.items()} | {
            name: getattr(self, name) for name in ("memory_bytes", "memory_bandwidth", "nvlink_bandwidth",
                                                   "network_bandwidth")}
        for name, value in rates.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{self.name}: {name} must be a finite number > 0, got {value!r}")
        for name in ("nvlink_latency_s", "network_latency_s", "reserved_memory_bytes"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name}: {name} must be a finite number >= 0, got {value!r}")
        if self.reserved_memory_bytes >= self.memory_bytes:
            raise ValueError(f"{self.name}: reserved_memory_bytes ({self.reserved_memory_bytes:g}) must be less than "
                             f"memory_bytes ({self.memory_bytes:g})")

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes - self.reserved_memory_bytes

    def compute_precision(self, weight_precision: str) -> str:
        """The precision matmuls run in: the weights' own if the device has tensor cores for it, else the next wider.

        fp4 weights on an H100 (no fp4 tensor cores) compute in fp8; fp8 on a CPU computes in bf16.
        """
        if weight_precision in WEIGHT_ONLY:
            return "bf16"
        weight_precision = "fp4" if weight_precision == "mxfp4" else weight_precision
        order = PRECISIONS[PRECISIONS.index(weight_precision):: -1]
        for precision in order:
            if precision in self.peak_flops:
                return precision
        return "bf16"

    def peak(self, weight_precision: str) -> float:
        """Dense peak FLOP/s for matmuls with weights in `weight_precision`."""
        return self.peak_flops[self.compute_precision(weight_precision)]

    def link(self, group_span: int) -> tuple[float, float]:
        """(bandwidth, latency) of a collective whose devices span `group_span` consecutive devices.

        A group that fits in one NVLink domain uses NVLink; a group that crosses domains is bounded by the
        scale-out network for all its traffic (conservative: a hierarchical collective would do better).
        """
        if group_span <= self.nvlink_domain:
            return self.nvlink_bandwidth, self.nvlink_latency_s
        return self.network_bandwidth, self.network_latency_s

    def with_efficiency(self, efficiency: Efficiency | dict[str, float]) -> Hardware:
        """A copy with other efficiency factors (a dict may give only some of them)."""
        if isinstance(efficiency, dict):  # PyYAML reads 1e-3 (no dot) as a string: coerce numbers
            efficiency = dataclasses.replace(self.efficiency, **{k: _number(v) for k, v in efficiency.items()})
        return dataclasses.replace(self, efficiency=efficiency)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Hardware keys {unknown}; known keys: {sorted(known)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"missing Hardware keys {missing}")
        # PyYAML reads 1.0e9 (no exponent sign) as a string: coerce every number explicitly.
        data["efficiency"] = Efficiency(**{k: float(v) for k, v in data.get("efficiency", {}).items()})
        data["peak_flops"] = {k: float(v) for k, v in data["peak_flops"].items()}
        for name in ("memory_bytes", "memory_bandwidth", "nvlink_bandwidth", "nvlink_latency_s",
                     "network_bandwidth", "network_latency_s", "reserved_memory_bytes"):
            if name in data:
                data[name] = float(data[name])
        return cls(**data)


def load_hardware(source: str | Path, efficiency: str | Path | dict | None = None) -> Hardware:
    """Load a Hardware from `configs/hardware/<name>.yaml` (bare name) or a YAML path.

    Args:
        source: bare name such as 'h100-sxm', or a path to a YAML file.
        efficiency: optional efficiency factors overriding the file's: a dict, or a path to a YAML/JSON file
            written by `moejax.planner.calibrate.save_efficiency`.

    Raises:
        FileNotFoundError: no such file or built-in name (the message lists the built-in names).
        ValueError: a file that is not a YAML mapping of valid Hardware (or efficiency) fields, naming the file.
    """
    path = Path(source)
    if not path.exists() and "/" not in str(source) and path.suffix not in (".yaml", ".yml", ".json"):
        path = configs_dir() / "hardware" / f"{source}.yaml"
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise FileNotFoundError(f"hardware config {str(source)!r} {what}; built-in: {list_hardware()} "
                                f"(or a path to a YAML file)")
    data = _read_mapping(path, "hardware config")
    data.setdefault("name", path.stem)
    try:
        hw = Hardware.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"hardware config {path}: {_describe(err)}") from err
    if efficiency is not None:
        where = "efficiency factors"
        if not isinstance(efficiency, dict):
            where = f"efficiency file {efficiency}"
            loaded = _read_mapping(Path(efficiency), "efficiency file")  # JSON is YAML
            efficiency = loaded.get("efficiency", loaded)
        try:
            hw = hw.with_efficiency(efficiency)
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: {_describe(err)}; known factors: "
                             f"{[f.name for f in dataclasses.fields(Efficiency)]}") from err
    return hw


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML (or JSON) mapping in `path`; a clear error naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} " + ("is not a file" if path.exists() else "not found"))
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing key {err.args[0]!r}"
    return str(err)


def list_hardware() -> list[str]:
    """Names of the built-in hardware configs."""
    return sorted(p.stem for p in (configs_dir() / "hardware").glob("*.yaml"))
