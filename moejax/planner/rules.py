"""Which (DP, TP, EP, PP) layouts of N devices the planner considers, and why the others are rejected.

Every layout whose factors multiply to N is generated (`Layout.enumerate(n)`), then each rule below either
accepts it or names the numbers that break it. The rules start from the runtime's own check,
`moejax.mesh.Layout.problems` (what `Layout.validate` raises), called rather than restated, so with default
`Rules()` the accepted set is exactly the layouts the runtime builds: the vocabulary and the expert, shared-expert
and dense FFN widths need not divide anything, since the runtime pads them (`moejax.model.transformer.Geometry`;
the planner counts bytes and FLOPs on the padded sizes, `moejax.planner.memory.stored_config`). Flags only
tighten, with deployment knowledge (no KV-head replication, tensor or expert groups inside one NVLink domain, a
minimum of layers per stage). `split_moe` adds the layouts whose MoE tensor factor differs from the attention one
(`TP8MTP1EP8`, `moejax.planner.layout.PlanLayout`): attention TP x ADP and MoE TP x EP over the same devices,
which the runtime runs too (`moejax.mesh.Layout.split`), checked by the same rules with the same messages (the
expert width is padded to the MoE tensor factor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moejax.config import ModelConfig
from moejax.mesh import Layout
from moejax.planner.layout import PlanLayout, enumerate_split


@dataclass(frozen=True)
class Rules:
    """Switches over the layout rules; the defaults are the runtime's.

    Attributes:
        allow_kv_replication: allow TP above the KV-head count (KV heads are replicated, as the runtime does);
            False tightens to TP <= K.
        tp_within_domain: tighten: the tensor group must fit one NVLink domain.
        ep_within_domain: tighten: the tensor x expert group must fit one NVLink domain.
        min_layers_per_stage: tighten: each pipeline stage holds at least this many layers.
        split_moe: also enumerate layouts with the MoE split apart from attention (MTP != TP).
    """

    allow_kv_replication: bool = True
    tp_within_domain: bool = False
    ep_within_domain: bool = False
    min_layers_per_stage: int = 1
    split_moe: bool = False

    def describe(self, nvlink_domain: int | None = None) -> list[str]:
        """The rules in force, one line each, as printed with the count."""
        domain = f" ({nvlink_domain} devices)" if nvlink_domain else ""
        lines = [
            "DP x TP x EP x PP = number of devices",
            "TP divides the attention heads",
            ("TP divides the KV heads, or the KV heads divide TP (KV heads replicated)" if self.allow_kv_replication
             else "TP divides the KV heads (no KV-head replication)"),
            "vocabulary, routed-expert and dense FFN widths padded to a multiple of TP, shared-expert width to TP x EP",
            "EP divides the number of routed experts",
            f"PP <= layers / {self.min_layers_per_stage} (at least {self.min_layers_per_stage} layer(s) per stage)",
        ]
        if self.tp_within_domain:
            lines.append(f"TP fits one NVLink domain{domain}")
        if self.ep_within_domain:
            lines.append(f"TP x EP fits one NVLink domain{domain}")
        if self.split_moe:
            lines.append("MoE split apart from attention (MTP != TP: DP x MTP x EP x PP = number of devices, MTP x EP "
                         "a multiple of TP) allowed; expert width padded to a multiple of MTP")
        return lines

    def problems(self, layout: Layout | PlanLayout, cfg: ModelConfig, nvlink_domain: int | None = None) -> list[str]:
        """Every rule `layout` breaks for `cfg`, each naming the numbers involved: the runtime's
        (`Layout.problems`), then the tightening flags."""
        t, e, s = layout.tensor, layout.expert, layout.stage
        mt = layout.moe_tp if isinstance(layout, Layout) else layout.moe_tensor
        out = layout.problems(cfg)  # the runtime's messages, word for word
        if not self.allow_kv_replication and t > cfg.num_kv_heads:
            out.append(f"TP ({t}) exceeds the kv heads ({cfg.num_kv_heads}) and KV replication is disallowed")
        if s <= cfg.num_layers < s * self.min_layers_per_stage:  # tighter than the runtime's "stage (s) ..." rule
            out.append(f"PP ({s}) x min layers per stage ({self.min_layers_per_stage}) exceeds the layers "
                       f"({cfg.num_layers})")
        if nvlink_domain and self.tp_within_domain and t > nvlink_domain:
            out.append(f"TP ({t}) exceeds the NVLink domain ({nvlink_domain})")
        if nvlink_domain and self.ep_within_domain and mt * e > nvlink_domain:
            out.append(f"TP x EP ({mt * e}) exceeds the NVLink domain ({nvlink_domain})")
        return out


def enumerate_layouts(n_devices: int, cfg: ModelConfig, rules: Rules | None = None, nvlink_domain: int | None = None,
                      only: Sequence[Layout | PlanLayout | str] | None = None
                      ) -> tuple[list[Layout | PlanLayout], list[tuple[Layout | PlanLayout, list[str]]]]:
    """All layouts of exactly `n_devices`, split into accepted ones and rejected ones with their reasons.

    Args:
        n_devices: the device count N.
        cfg: the model the rules are checked against.
        rules: rule switches (default: the runtime's rules).
        nvlink_domain: devices per NVLink domain, for the domain rules.
        only: check these layouts instead (`Layout.parse` syntax, `MTP` included, whatever `rules.split_moe`
            says); ValueError for one of another device count.

    Returns:
        (accepted layouts, [(rejected layout, reasons)]), runtime layouts first (sorted), then split ones; with
        `only`, in its order.
    """
    rules = rules or Rules()
    if only is not None:
        candidates = [_candidate(layout) for layout in only]
        wrong = [f"layout {lay} uses {lay.size} devices" for lay in candidates if lay.size != n_devices]
        if wrong:
            raise ValueError(f"{'; '.join(wrong)}, not the {n_devices} planned")
    else:
        candidates = Layout.enumerate(n_devices) + (enumerate_split(n_devices) if rules.split_moe else [])
    accepted, rejected = [], []
    for layout in candidates:
        problems = rules.problems(layout, cfg, nvlink_domain)
        if problems:
            rejected.append((layout, problems))
        else:
            accepted.append(layout)
    return accepted, rejected


def _candidate(layout: Layout | PlanLayout | str) -> Layout | PlanLayout:
    """A named layout as `enumerate_layouts` lists it: a runtime `Layout`, or a split one's `PlanLayout`."""
    if isinstance(layout, PlanLayout):
        return layout
    layout = Layout.parse(layout)
    return PlanLayout.of(layout) if layout.split else layout
