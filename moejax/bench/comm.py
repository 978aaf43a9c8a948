"""Communication accounting: the collectives a compiled step runs, read from its HLO, beside the planner's volume.

`collectives(hlo_text)` finds every all-reduce, all-gather, reduce-scatter, all-to-all, ragged-all-to-all
and collective-permute of a compiled (SPMD-partitioned) module and how many times one step runs it
(synchronous, and the asynchronous `-start` forms a GPU program uses, each counted once with its `-done`):
`while` bodies count their known trip count (the layer scan, `known_trip_count` in the backend
config; an unknown count is taken as 1 and marked), `call`s, fusions and async wrappers count once,
and a `conditional` counts its heaviest branch: the critical path of one step, seen from one device.
With pipeline stages, a pipelined step (one tick) runs the device's own stage once and sends its
activations once; the sequential step (microbatches 1) loops over the stages, each turn a
conditional on the stage index, so every stage's collectives lie on its path, as its time pays them.

Shapes in a partitioned module are per device, so each collective's operand bytes are what one
device contributes. Wire bytes are what one device sends under the ring algorithms the planner
assumes (`moejax.planner.cost`), with n the size of the collective's group:

    all-reduce 2 (n-1)/n x operand   all-gather (n-1) x operand   reduce-scatter (n-1)/n x operand
    all-to-all (n-1)/n x operand     collective-permute 1 x operand (a device that sends)
    ragged-all-to-all (n-1)/n x operand

A ragged-all-to-all's sizes are data (routing), known only when it runs: its operand bytes are those of
its send buffer, the most one device can send, so its figures are upper bounds (`Collective.bound`).

Each collective is attributed to the named block it came from (`jax.named_scope` in the model:
`attn`, `moe`, `embed`, ...) or else to its JAX primitive (`ppermute`, `psum`, `reshard`), from
the op_name metadata XLA keeps. A collective that moves data as it is (all-gather, all-to-all,
collective-permute, reduce-scatter) with an operand of a matrix weight's shape (whole, a device's
shard, one layer or one expert of it: `weight_shapes`) is flagged as moving weights, which a serving
step should never do (e.g. an all-gather of the experts). All-reduces sum partial results and are
not flagged; a shape match can in principle be an activation of the same shape (read the op_name).

`planner_volume` is the planner's volume for the same tokens and schedule, from the collectives
`moejax.planner.cost` counts (the runtime's: attention TP all-reduces, the MoE's gather / all-to-all /
reduce-scatter / closing all-reduce, for runtime and split layouts alike) and the pipeline sends: per
pipelined tick the busiest stage and one send, per sequential step every stage and one send per boundary.
Its "expected" figure is the planner's prediction (expected routing fanout); its "capacity" figure counts
the runtime's fixed-capacity all-to-all as the compiled program bounds it, which is what the HLO shows.
`decode_comparison` and `split_table` put the two beside a compiled decode step.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_ASYNC = {f"{k}-start": k for k in KINDS}
_MOVES = ("all-gather", "all-to-all", "ragged-all-to-all", "collective-permute", "reduce-scatter")  # data as it is
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f4e2m1fn": 0.5}
_NUMPY_TO_HLO = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int32": "s32",
                 "int8": "s8", "uint8": "u8", "uint32": "u32", "int64": "s64", "bool": "pred",
                 "float8_e4m3fn": "f8e4m3fn", "float8_e5m2": "f8e5m2"}
_SKIP_SCOPE = re.compile(r"^(jit\(.*\)|pjit|shard_map|cond|branch_\d+_fun|while|body|closed_call|scan|"
                         r"remat|checkpoint|vmap\(.*\)|jvp\(.*\))$")

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def loop_body(attrs: str) -> tuple[str | None, int | None]:
    """A `while` instruction's body computation and its known trip count (None: unknown)."""
    body, trip = re.search(r"body=%?([\w.\-]+)", attrs), _TRIP.search(attrs)
    return (body.group(1) if body else None), (int(trip.group(1)) if trip else None)


def branches(attrs: str) -> list[str]:
    """A `conditional` instruction's branch computations (indexed or true/false form)."""
    indexed = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    return (re.findall(r"%?([\w.\-]+)", indexed.group(1)) if indexed else
            re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", attrs))


def callees(attrs: str) -> list[str]:
    """The computations an instruction calls (fusions, calls, reducers)."""
    return re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", attrs)


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a step and how often the step runs it.

    Attributes:
        kind: one of KINDS (async `-start` forms are folded into their kind).
        shape: the per-device result type, e.g. 'f32[8,128]'.
        operand_bytes: bytes one device contributes to one execution.
        group: devices in its group (for collective-permute: devices that send).
        executions: times one step runs it (loop trip counts multiplied; 1 per branch taken).
        scope: the named block it came from ('attn', 'moe', 'embed', ...) or its primitive.
        op_name: XLA's op_name metadata.
        trip_known: False when it sits in a loop whose trip count XLA does not know (counted once).
        weight_move: its operand has the shape of a weight.
    """

    kind: str
    shape: str
    operand_bytes: float
    group: int
    executions: int
    scope: str
    op_name: str
    trip_known: bool = True
    weight_move: bool = False

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends per execution (ring algorithms; see the module docstring)."""
        n, b = self.group, self.operand_bytes
        if self.kind == "collective-permute":
            return b
        if n <= 1:
            return 0.0
        return {"all-reduce": 2.0 * (n - 1) / n * b, "all-gather": (n - 1) * b, "reduce-scatter": (n - 1) / n * b,
                "all-to-all": (n - 1) / n * b, "ragged-all-to-all": (n - 1) / n * b}[self.kind]

    @property
    def bound(self) -> bool:
        """True when the bytes are an upper bound (a ragged-all-to-all: its send buffer, not what the routing sends)."""
        return self.kind == "ragged-all-to-all"


@dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    attrs: str


def _split_type(rest: str) -> tuple[str, str]:
    """('(f32[2], s32[])' or 'f32[8,128]{1,0}', the text after it) from an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def parse_module(text: str) -> tuple[dict[str, list[_Instr]], str, int]:
    """(instructions by computation, entry computation name, num_partitions) of an HLO module's text."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    parts = re.search(r"num_partitions=(\d+)", text)
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            typ, tail = _split_type(m.group(2))
            op = re.match(r"([\w\-]+)\(", tail)
            if op:
                comps[current].append(_Instr(m.group(1), typ, op.group(1), tail[op.end():]))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    return comps, entry, int(parts.group(1)) if parts else 1


def _arrays(typ: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(typ)]


def _nbytes(arrays) -> float:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in arrays)


def _group_size(attrs: str, partitions: int) -> int:
    m = re.search(r"replica_groups=\{(\{[\d,]*\})", attrs)
    if m:
        return max(1, len([x for x in m.group(1).strip("{}").split(",") if x]))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        return len(re.findall(r"\{\d+,\d+", m.group(0)))
    return partitions  # replica_groups={} : every device


def _operand(kind: str, opcode: str, typ: str, group: int) -> tuple[list, float]:
    """(the operand's arrays, its bytes per device) from the result type of a collective.

    GPU async starts of all-to-all, reduce-scatter and ragged-all-to-all are typed `((operands...), result)`:
    the inner tuple is the operand (for a ragged-all-to-all: input, output buffer, then the four offset and
    size arrays; its input is what it sends).
    """
    if opcode.endswith("-start") and typ.startswith("(("):
        arrays = _arrays(_split_type(typ[1:])[0])
        arrays = arrays[:1] if kind == "ragged-all-to-all" else arrays
        return arrays, _nbytes(arrays)
    arrays = _arrays(typ)
    if kind == "ragged-all-to-all":  # synchronous form: typed as its output buffer, the size of what it may receive
        return arrays[:1], _nbytes(arrays[:1])
    if opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
        arrays = arrays[: max(1, len(arrays) // 2)] if kind == "all-gather" else arrays[:1]  # (operand, output, ...)
        return arrays, _nbytes(arrays)
    if kind == "all-gather":
        return arrays, _nbytes(arrays) / max(group, 1)
    if kind == "reduce-scatter":
        return arrays, _nbytes(arrays) * group
    return arrays, _nbytes(arrays)


def _scope(op_name: str) -> str:
    parts = [p for p in op_name.split("/") if p and not _SKIP_SCOPE.match(p)]
    return parts[0] if parts else "top"


def collectives(text: str, weight_shapes: set[tuple[str, tuple[int, ...]]] | None = None) -> list[Collective]:
    """Every collective one execution of the compiled module runs (see the module docstring), with counts."""
    comps, entry, partitions = parse_module(text)
    weight_shapes = weight_shapes or set()
    memo: dict[str, list[tuple[Collective, int]]] = {}

    def visit(name: str, trip_known: bool) -> list[tuple[Collective, int]]:
        key = f"{name}:{trip_known}"
        if key in memo:
            return memo[key]
        memo[key] = []  # guards against cycles (none in valid HLO)
        out: list[tuple[Collective, int]] = []
        for ins in comps.get(name, []):
            kind = _ASYNC.get(ins.opcode, ins.opcode)
            if kind in KINDS and not ins.opcode.endswith("-done"):
                group = _group_size(ins.attrs, partitions)
                arrays, nbytes = _operand(kind, ins.opcode, ins.type, group)
                op = _OP_NAME.search(ins.attrs)
                op_name = op.group(1) if op else ""
                moved = kind in _MOVES and any(a in weight_shapes for a in arrays)
                shape = ins.type.split("{")[0] if not ins.type.startswith("(") else ins.type
                out.append((Collective(kind, shape, nbytes, group, 1, _scope(op_name) if op_name else ins.name,
                                       op_name, trip_known, moved), 1))
            elif ins.opcode == "while":
                body, trip = loop_body(ins.attrs)
                count = 1 if trip is None else trip
                if body:
                    out += [(c, n * count) for c, n in visit(body, trip_known and trip is not None)]
            elif ins.opcode == "conditional":
                costs = [visit(b, trip_known) for b in branches(ins.attrs)]
                if costs:
                    out += max(costs, key=lambda cs: sum(c.wire_bytes * n for c, n in cs))
            else:
                for callee in callees(ins.attrs):
                    if ins.opcode in ("call", "fusion", "async-start", "custom-call") or ins.opcode.endswith("start"):
                        out += visit(callee, trip_known)
        memo[key] = out
        return out

    merged: dict[int, tuple[Collective, int]] = {}
    for c, n in visit(entry, True):
        prev = merged.get(id(c))
        merged[id(c)] = (c, n + (prev[1] if prev else 0))
    return [Collective(**{**asdict(c), "executions": n}) for c, n in merged.values()]


def summarize(colls: list[Collective]) -> dict:
    """Totals per kind and per scope (count = executions per step; bytes per device per step), and flags."""
    by_kind = {k: {"count": 0, "operand_bytes": 0.0, "wire_bytes": 0.0} for k in KINDS}
    by_scope: dict[str, float] = {}
    for c in colls:
        entry = by_kind[c.kind]
        entry["count"] += c.executions
        entry["operand_bytes"] += c.operand_bytes * c.executions
        entry["wire_bytes"] += c.wire_bytes * c.executions
        by_scope[c.scope] = by_scope.get(c.scope, 0.0) + c.wire_bytes * c.executions
    return {"by_kind": by_kind, "by_scope": by_scope,
            "wire_bytes": sum(v["wire_bytes"] for v in by_kind.values()),
            "operand_bytes": sum(v["operand_bytes"] for v in by_kind.values()),
            "weight_moves": [f"{c.kind} {c.shape} ({c.op_name or 'no op_name'})" for c in colls if c.weight_move],
            "unknown_trip_counts": sum(not c.trip_known for c in colls)}


# ---- the engine's step ---------------------------------------------------------------------------


def weight_shapes(model) -> set[tuple[str, tuple[int, ...]]]:
    """(HLO dtype, dims) a collective moving a weight would have: each matrix weight whole, as a device's shard,
    and (for weights stacked over layers, under `layers`) one layer of either, and one layer's expert of the
    experts' stacks (under `moe`).

    Vectors (norms, also when stacked over layers) are left out: their shapes are those of activations. So is one
    head of a stacked attention weight (wo's [H, D]), which is the shape of tokens a split layout's MoE gathers
    ([2 x 8, 128] on tiny-moe).
    """
    import jax

    out = set()
    for path, arr in jax.tree_util.tree_leaves_with_path(model.params):
        dtype = _NUMPY_TO_HLO.get(str(arr.dtype), str(arr.dtype))
        keys = [getattr(p, "key", None) for p in path]
        stacked = keys[:1] == ["layers"]
        full, shard = tuple(arr.shape), tuple(arr.sharding.shard_shape(arr.shape))
        if stacked and len(full) < 3:
            continue  # a vector per layer
        candidates = [full, shard] + ([full[1:], shard[1:]] if stacked else [])
        candidates += [full[2:], shard[2:]] if stacked and "moe" in keys else []  # [L, E, ...]: one expert
        out |= {(dtype, dims) for dims in candidates if len(dims) >= 2}
    return out


def account(engine) -> dict:
    """Collectives of the engine's decode step (largest bucket) and prefill chunk, with the program memory.

    Returns {"decode": summary, "prefill": summary, "program_bytes": most bytes per device of the two
    programs (arguments + outputs - aliased + temporaries), "tokens": {"decode": rows per batch shard,
    "prefill": tokens per batch shard}}.
    """
    shapes = {"decode": (engine.decode_buckets[-1], 1),
              "prefill": (engine.config.max_prefill_seqs, engine.config.chunk_size)}
    prefill_model = engine.prefill.model if getattr(engine, "prefill", None) is not None else engine.model
    weights = {"decode": weight_shapes(engine.model), "prefill": weight_shapes(prefill_model)}
    out: dict = {"tokens": {}}
    program = 0
    for phase, (rows, T) in shapes.items():
        compiled = engine.compiled_step(phase, rows)  # disaggregated: the prefill model's prefill program
        out[phase] = summarize(collectives(compiled.as_text(), weights[phase]))
        out["tokens"][phase] = rows * T
        mem = compiled.memory_analysis()
        if mem is not None:
            program = max(program, mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes)
    out["program_bytes"] = program
    return out


EXCHANGE_FIGURES = ("expected", "capacity")  # `planner_volume`'s two figures for the MoE all-to-all
_ROUTING_BYTES = 4 + 4  # per (token, expert slot): a float32 gate and an int32 expert id, as the router makes them


def planner_volume(cfg, layout, expert_mode: str, group_tokens: float, act_bytes: float, hw,
                   pipelined: bool = False, exchange: str = "expected") -> dict:
    """The planner's bytes one device sends per step, for `group_tokens` tokens per batch shard (attention group).

    The collectives are those `moejax.planner.cost` counts, the runtime's (`moejax.sharding.Parallelism`'s
    gather, exchange and reduce axes), for runtime and split layouts (`TP4MTP1EP8`) alike. `exchange` picks the
    figure for the MoE's token exchange:

    - "expected" (the planner's prediction): every token sent to the distinct remote expert ranks its top-X
      experts live on, on average (`moejax.planner.cost.expert_fanout`), activations only.
    - "capacity" (the runtime's bound, what HLO accounting reads): the runtime's all-to-all has a fixed row
      capacity picked by a `lax.switch` (`moejax.model.moe`), and the accounting counts the heaviest branch: M
      rows to every expert rank each way (M: the tokens the device exchanges, its gathered tokens over its
      `tensor_expert` slices), the local expert ids (int32) and gates (activation bytes) riding along on the
      dispatch, plus the int32 all-reduce that picks the capacity; and where the MoE's tensor parallelism
      gathers the tokens, their routing (a float32 gate and an int32 id per expert slot) gathered with them.
      This is the 'all_to_all' exchange's program (CPU's); 'ragged_all_to_all' sends from buffers of as many
      rows, which the accounting also reads as bounds, and all-gathers the row counts instead of the max.

    The all-reduces, the gather's tokens and the reduce-scatter are the same in both. Outside the layers (the
    embedding's all-reduce, the logits' gather, flags) nothing is counted.

    `pipelined`: the step is one pipeline tick (each device runs its own stage, the busiest one is
    the step's critical path, and sends once); else the sequential schedule (every stage in turn,
    one send per boundary). A send is the microbatch's whole activations: every device of a
    stage holds them (replicated over attention TP between layers) and sends its copy.

    Returns {"layers": the layers' collectives, "tensor": what the same layers send with the MoE on attention's
    tensor group alone (EP 1), "expert": the rest (expert axes, gather), "send": pipeline sends, "total",
    "by_kind": bytes by HLO kind (`KINDS`), sends included, "exchange"}.
    """
    from moejax.mesh import Layout
    from moejax.planner.cost import COLLECTIVES, Load, stage_features
    from moejax.planner.layout import PlanLayout
    from moejax.planner.memory import stages
    from moejax.planner.workload import Options, Workload

    if exchange not in EXCHANGE_FIGURES:
        raise ValueError(f"exchange must be one of {EXCHANGE_FIGURES}, got {exchange!r}")
    lay = PlanLayout.of(layout, expert_mode)
    options, workload = Options(expert_mode=expert_mode), Workload(act_bytes=act_bytes)
    load = Load(decode=group_tokens, group_decode=group_tokens)
    tensor_only = PlanLayout.of(Layout(lay.data, lay.tensor, 1, lay.stage), expert_mode)

    def volume(features: dict) -> float:
        return sum(features[f"{k}_count"] * features[f"{k}_wire"] for k in COLLECTIVES)

    per_stage = []
    for stage in stages(cfg, lay):
        f = stage_features(cfg, lay, hw, workload, options, stage, load)
        kinds = _stage_kinds(cfg, lay, f, stage.moe_layers, group_tokens, act_bytes, exchange)
        per_stage.append((sum(kinds.values()), volume(stage_features(cfg, tensor_only, hw, workload, options, stage,
                                                                      load)), kinds))
    if pipelined:
        per_stage = [max(per_stage, key=lambda v: v[0])]
        boundaries = 1 if lay.stage > 1 else 0
    else:
        boundaries = lay.stage - 1
    layers, tensor = sum(v[0] for v in per_stage), sum(v[1] for v in per_stage)
    by_kind = {k: sum(v[2].get(k, 0.0) for v in per_stage) for k in KINDS}
    send = boundaries * group_tokens * cfg.hidden_size * act_bytes
    by_kind["collective-permute"] += send
    return {"layers": layers, "tensor": tensor, "expert": layers - tensor, "send": send, "total": layers + send,
            "by_kind": by_kind, "exchange": exchange}


def _stage_kinds(cfg, lay, f: dict, moe_layers: int, group_tokens: float, act_bytes: float, exchange: str) -> dict:
    """Bytes one device sends through one stage by HLO kind, from the planner's features `f` (see `planner_volume`)."""
    gather = f["gather_count"] * f["gather_wire"]  # an all-gather and a reduce-scatter, (z-1) messages each
    out = {"all-reduce": f["tp_count"] * f["tp_wire"] + f["moe_count"] * f["moe_wire"],
           "all-gather": gather / 2, "reduce-scatter": gather / 2, "all-to-all": f["a2a_count"] * f["a2a_wire"]}
    if exchange == "expected":
        return out
    _, y, z, _ = lay.layout.split_factors
    if f["gather_count"]:
        out["all-gather"] += moe_layers * (z - 1) * group_tokens * cfg.num_experts_per_tok * _ROUTING_BYTES
    if f["a2a_count"]:
        e, x = lay.expert, cfg.num_experts_per_tok
        rows = math.ceil(math.ceil(z * group_tokens) / y)  # a tensor_expert slice of the gathered tokens
        dispatch = rows * (cfg.hidden_size * act_bytes + x * (4 + act_bytes))  # tokens, local ids, gates
        out["all-to-all"] = moe_layers * (e - 1) * (dispatch + rows * cfg.hidden_size * act_bytes)
        out["all-reduce"] += moe_layers * 2.0 * (e - 1) / e * 4  # the capacity: an int32 max over the expert ranks
    return out


# ---- split layouts: the compiled decode step against the planner -----------------------------------------------

SPLIT_LAYOUTS = ("TP4MTP1EP8", "TP8MTP1EP8", "TP2MTP1EP4", "TP4MTP1EP4", "TP4MTP2EP2", "TP2MTP4EP2", "TP1MTP2EP4",
                 "TP2MTP4EP1", "DP2TP2MTP1EP2", "TP2MTP1EP2PP2")


def in_layers(c: Collective) -> bool:
    """Whether a collective is one of the layers' (what the planner counts per layer): from a layer's named block
    (`moejax.bench.results.LAYER_SCOPES`) or from the layer loop's body (the MoE's token gather, which runs
    outside the named blocks)."""
    from moejax.bench.results import LAYER_SCOPES

    return c.scope in LAYER_SCOPES or "/while/body/" in c.op_name


def decode_comparison(model, config=None, rows: int = 8) -> dict:
    """The compiled decode step's collectives (`rows` tokens per batch shard) beside the planner's two figures.

    Args:
        model: a placed `moejax.Model`.
        config: a `moejax.ServeConfig` (default: `rows` requests per batch shard and microbatch group, decode
            bucket `rows`).
        rows: decode tokens per batch shard.
    Returns:
        {"layout", "hlo": `summarize` of the layers' collectives and the pipeline sends, "other_bytes": the rest
        (embedding, logits, flags), "expected" and "capacity": `planner_volume` of both figures, "tokens"}.
    """
    import jax

    import moejax
    from moejax.planner.hardware import load_hardware

    layout = model.layout
    if config is None:
        groups = layout.data * (layout.attention_data if model.expert_mode == "dp_attention" else 1)
        config = moejax.ServeConfig(max_running=rows * groups * layout.stage, page_size=4,
                                    num_pages=4 * rows * layout.stage, chunk_size=8, max_prefill_seqs=2,
                                    max_model_len=16, decode_buckets=(rows,), seed=0)
    engine = moejax.Engine(model, config)
    tokens = engine.decode_buckets[-1]
    colls = collectives(engine.compiled_step("decode", tokens).as_text(), weight_shapes(model))
    planned = [in_layers(c) or c.kind == "collective-permute" for c in colls]
    act = jax.numpy.dtype(model.dtype).itemsize
    hw = load_hardware("cpu-host")
    plan = {mode: planner_volume(model.cfg, layout, model.expert_mode, tokens, act, hw, engine.pipelined, mode)
            for mode in EXCHANGE_FIGURES}
    return {"layout": str(layout), "hlo": summarize([c for c, p in zip(colls, planned, strict=True) if p]),
            "other_bytes": sum(c.wire_bytes * c.executions for c, p in zip(colls, planned, strict=True) if not p),
            "tokens": tokens, **plan}


def split_table(layouts=SPLIT_LAYOUTS, model: str = "tiny-moe", rows: int = 8, dtype: str = "float32") -> str:
    """A markdown table of the compiled decode step per layout (random weights of the built-in config `model` on
    simulated CPU devices, `decode_comparison`), `format_split_table`:

        python -c "import moejax; moejax.cpu_devices(8); from moejax.bench.comm import split_table; \\
                   print(split_table())"
    """
    import moejax
    from moejax.config import load_model_config

    cfg = load_model_config(model)
    compared = [decode_comparison(moejax.Model.random(cfg, layout=layout, dtype=dtype), rows=rows)
                for layout in layouts]
    return (f"Decode step, {model} ({dtype}), {rows} tokens per batch shard, bytes one device sends per step:\n\n"
            + format_split_table(compared))


def format_split_table(compared: list[dict]) -> str:
    """Rows of `decode_comparison`: the layers' collectives and the pipeline sends by kind (executions per step:
    bytes one device sends), those outside the layers apart, their HLO total, the planner's expected and
    capacity figures (`planner_volume`) and HLO / each."""
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
             "ragged-all-to-all": "RA2A", "collective-permute": "send"}
    lines = ["| layout | collectives (count: bytes) | outside the layers | HLO | planner expected (HLO / it) | "
             "planner capacity (HLO / it) |", "|---|---|---:|---:|---:|---:|"]
    for row in compared:
        kinds = ", ".join(f"{short[k]} {v['count']}: {v['wire_bytes']:.0f}"
                          for k, v in row["hlo"]["by_kind"].items() if v["count"])
        hlo, exp, cap = row["hlo"]["wire_bytes"], row["expected"]["total"], row["capacity"]["total"]
        lines.append(f"| {row['layout']} | {kinds or '-'} | {row['other_bytes']:.0f} | {hlo:.0f} | "
                     f"{exp:.0f} ({_ratio(hlo, exp)}) | {cap:.0f} ({_ratio(hlo, cap)}) |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"
