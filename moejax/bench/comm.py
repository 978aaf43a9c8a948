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

`planner_volume` is the planner's predicted volume for the same tokens and schedule, from
`moejax.planner.cost.stage_comm_time` (two TP all-reduces per layer, and the expert-axis term of the
model's expert mode) and the pipeline sends: per pipelined tick the busiest stage and one send, per
sequential step every stage and one send per boundary.
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
    and (for weights stacked over layers, under `layers`) one layer or one layer's expert of either.

    Vectors (norms, also when stacked over layers) are left out: their shapes are those of activations.
    """
    import jax

    out = set()
    for path, arr in jax.tree_util.tree_leaves_with_path(model.params):
        dtype = _NUMPY_TO_HLO.get(str(arr.dtype), str(arr.dtype))
        stacked = bool(path) and getattr(path[0], "key", None) == "layers"
        full, shard = tuple(arr.shape), tuple(arr.sharding.shard_shape(arr.shape))
        if stacked and len(full) < 3:
            continue  # a vector per layer
        candidates = [full, shard] + ([full[1:], shard[1:], full[2:], shard[2:]] if stacked else [])
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
    weights = weight_shapes(engine.model)
    out: dict = {"tokens": {}}
    program = 0
    for phase, (rows, T) in shapes.items():
        compiled = engine.compiled_step(phase, rows)
        out[phase] = summarize(collectives(compiled.as_text(), weights))
        out["tokens"][phase] = rows * T
        mem = compiled.memory_analysis()
        if mem is not None:
            program = max(program, mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes)
    out["program_bytes"] = program
    return out


def planner_volume(cfg, layout, expert_mode: str, group_tokens: float, act_bytes: float, hw,
                   pipelined: bool = False) -> dict:
    """The planner's predicted bytes one device sends per step, for `group_tokens` tokens per batch shard.

    `pipelined`: the step is one pipeline tick (each device runs its own stage, the busiest one is
    the step's critical path, and sends once); else the sequential schedule (every stage in turn,
    one send per boundary). A send is the microbatch's whole activations: every device of a
    stage holds them (replicated over `tensor` between layers) and sends its copy.

    Returns {"layers": TP and expert-axis collectives, "tensor": the TP part of it, "expert": the
    expert-axis part, "send": pipeline sends, "total"}.
    """
    import dataclasses

    from moejax.planner.cost import Load, stage_comm_time
    from moejax.planner.memory import stages
    from moejax.planner.workload import Options, Workload

    options = Options(expert_mode=expert_mode)
    workload = Workload(act_bytes=act_bytes)
    load = Load(decode=group_tokens, group_decode=group_tokens)
    no_expert = dataclasses.replace(layout, expert=1)
    per_stage = [(stage_comm_time(cfg, layout, hw, workload, options, stage, load)[0],
                  stage_comm_time(cfg, no_expert, hw, workload, options, stage, load)[0])
                 for stage in stages(cfg, layout)]
    if pipelined:
        layers, tensor = max(per_stage)
        boundaries = 1 if layout.stage > 1 else 0
    else:
        layers, tensor = (sum(x) for x in zip(*per_stage, strict=True))
        boundaries = layout.stage - 1
    send = boundaries * group_tokens * cfg.hidden_size * act_bytes
    return {"layers": layers, "tensor": tensor, "expert": layers - tensor, "send": send, "total": layers + send}
