"""The planner's layout: attention and MoE may split the same devices differently (the runtime's are special cases).

TensorRT-LLM (and vLLM / SGLang) give attention `tp` x `dp` and the MoE `moe_tp` x `moe_ep` of the same devices.
The planner writes that `TP{tp}MTP{moe_tp}EP{moe_ep}` (plus `DP`, `PP` as the runtime does): the attention
data-parallel factor is derived, ADP = MTP x EP / TP. Without an `MTP` factor the string is a runtime
`moejax.mesh.Layout` and `expert_mode` (`moejax.sharding.EXPERT_MODES`) says what the expert axis does
outside the MoE blocks:

    runtime 'TP2EP4', expert_mode 'dp_attention'       -> attention TP2 x ADP4, MoE TP2 x EP4 (TRT-LLM tp2 dp4 etp2 ep4)
    runtime 'TP2EP4', expert_mode 'replicated_attention' -> attention TP2 replicated 4 times, MoE TP2 x EP4
    'TP8MTP1EP8'                                -> attention TP8, MoE EP8 (TRT-LLM tp8 etp1 ep8)
    'TP4MTP1EP8'                                -> attention TP4 x ADP2, MoE EP8

Per pipeline stage and replica there are G = MTP x EP devices; attention uses TP x ADP of them and is
replicated G / (TP x ADP) times (only the runtime's 'replicated_attention' mode replicates).
"""

from __future__ import annotations

from dataclasses import dataclass

from moejax.mesh import Layout


@dataclass(frozen=True, order=True)
class PlanLayout:
    """A layout with attention and MoE splits apart (see module docstring). Field names follow `Layout`."""

    data: int = 1
    tensor: int = 1  # attention tensor parallelism
    expert: int = 1  # MoE expert parallelism
    stage: int = 1
    moe_tensor: int = 1  # MoE tensor parallelism (each expert's width split)
    attention_data: int = 1  # attention data parallelism inside one replica and stage
    runtime: bool = True  # the string has no MTP factor (a `moejax.mesh.Layout`)

    def __post_init__(self):
        group = self.moe_tensor * self.expert
        if group % (self.tensor * self.attention_data):
            raise ValueError(f"attention TP {self.tensor} x ADP {self.attention_data} must divide MoE TP "
                             f"{self.moe_tensor} x EP {self.expert}")

    @classmethod
    def of(cls, layout: PlanLayout | Layout | str, expert_mode: str = "dp_attention") -> PlanLayout:
        """Parse a runtime layout (with its `expert_mode` mode) or a planner string with an `MTP` factor."""
        if isinstance(layout, PlanLayout):
            return layout
        base = Layout.parse(layout)  # one parser for the runtime and the planner (`MTP` included)
        if base.split:
            return cls(base.data, base.tensor, base.expert, base.stage, base.moe_tp, base.attention_data, False)
        adp = base.expert if expert_mode == "dp_attention" else 1
        return cls(base.data, base.tensor, base.expert, base.stage, base.tensor, adp, True)

    @property
    def layout(self) -> Layout:
        """The runtime's `Layout` of the same devices (the expert mode aside)."""
        return Layout(self.data, self.tensor, self.expert, self.stage, 0 if self.runtime else self.moe_tensor)

    def __str__(self) -> str:
        if self.runtime:
            return str(Layout(self.data, self.tensor, self.expert, self.stage))
        parts = [("DP", self.data), ("TP", self.tensor), ("MTP", self.moe_tensor), ("EP", self.expert),
                 ("PP", self.stage)]
        return "".join(f"{k}{v}" for k, v in parts if v > 1 or k in ("TP", "MTP"))

    @property
    def group(self) -> int:
        """Devices of one replica in one stage (MoE TP x EP)."""
        return self.moe_tensor * self.expert

    @property
    def replication(self) -> int:
        """How many times attention is replicated inside a group (> 1 only for the runtime's 'replicated_attention')."""
        return self.group // (self.tensor * self.attention_data)

    @property
    def shared_split(self) -> int:
        """Devices one shared expert's width is split over: attention TP, times the expert group where attention
        is replicated over it (the runtime's 'replicated_attention' mode, `moejax.sharding`)."""
        return self.tensor * self.replication

    @property
    def size(self) -> int:
        return self.data * self.group * self.stage

    def kv_heads_per_model(self, cfg) -> int:
        return max(cfg.num_kv_heads, self.tensor)

    def stage_layers(self, num_layers: int) -> list[int]:
        return Layout(stage=self.stage).stage_layers(num_layers)

    def problems(self, cfg) -> list[str]:
        """What the runtime refuses for the same layout (`moejax.mesh.Layout.problems` of `self.layout`, which
        `Layout.validate` raises), word for word. The MoE tensor factor adds no rule: the runtime pads the expert
        width to a multiple of it (`moejax.planner.memory.stored_config`)."""
        return self.layout.problems(cfg)


def enumerate_split(n_devices: int) -> list[PlanLayout]:
    """Every layout of `n_devices` whose MoE tensor factor differs from the attention one (the runtime's split
    layouts, `Layout.enumerate(split_moe=True)`)."""
    return sorted(PlanLayout.of(lay) for lay in Layout.enumerate(n_devices, split_moe=True) if lay.split)
