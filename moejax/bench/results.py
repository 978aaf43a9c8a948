"""The sweep's result files: rows as JSON lines, written whole, read back on resume, and the tables made of them.

`results.jsonl` / `failures.jsonl` hold one configuration per line, keyed by `KEY_FIELDS` (`key_of`). A row is
appended in one write (`append_row`): a Ctrl-C lands before or after it, and only a killed process can leave a
last line without its newline, which `read_rows` leaves out and the next `append_row` cuts off. The tables
(`results.csv`, `comm.csv`, `comm.md`) are rebuilt from the JSON lines on every run (`write_tables`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from moejax.axes import DEPRECATED_EXPERT_MODES

KEY_FIELDS = ("model", "platform", "layout", "expert_mode_requested", "chunk_size", "max_running", "dtype",
              "page_size", "max_prefill_seqs", "decode_buckets", "workload_id", "microbatches_requested",
              "quantization", "enable_prefix_caching", "async_scheduling", "prefill_layout")
# what a row written before the field ran with (prefill_layout None: aggregated, one model prefills and decodes)
_KEY_DEFAULTS = {"enable_prefix_caching": False, "async_scheduling": False, "prefill_layout": None}
LAYER_SCOPES = ("attn", "moe", "mlp", "ffn", "shared")  # named blocks inside a layer (the planner's per-layer terms)


def key_of(row: dict) -> tuple:
    return tuple(row.get(k, _KEY_DEFAULTS.get(k)) for k in KEY_FIELDS)


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of `path` (none if it does not exist); ValueError naming the line if one is not JSON.

    A last line without its newline is a write that never finished (rows are written whole, newline last, so
    only a killed process leaves one): it is left out, and `append_row` cuts it off before the next row.
    """
    if not path.exists():
        return []
    rows = []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(_renamed(json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err}); fix or remove it to resume the sweep") from err
    return rows


def _renamed(row: dict) -> dict:
    """A row written before the expert modes were renamed (`ep_attention`: "data" / "replicated"), in today's names,
    so a sweep resumes over it."""
    for old, new in (("ep_attention", "expert_mode"), ("ep_attention_requested", "expert_mode_requested")):
        if old in row and new not in row:
            value = row.pop(old)
            row[new] = DEPRECATED_EXPERT_MODES.get(value, value)
    return row


def append_row(path: Path, row: dict) -> None:
    """Append `row` as one JSON line in one write (a ^C is handled before or after it, never inside it); a
    partial last line left by a killed process is cut off first."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            os.ftruncate(fd, path.read_bytes().rfind(b"\n") + 1)
        while data:  # one call unless the file system takes less
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tables ------------------------------------------------------------------------------------

_CSV_METRICS = ("ttft_s", "tpot_s", "e2e_s", "tokens_per_s", "tokens_per_s_per_device", "tokens_per_s_per_user",
                "ttft_s_p50", "ttft_s_p90", "ttft_s_p99", "tpot_s_p50", "tpot_s_p90", "tpot_s_p99", "e2e_s_p50",
                "e2e_s_p90", "e2e_s_p99", "tokens_per_s_per_user_p50", "tokens_per_s_per_user_p90",
                "tokens_per_s_per_user_p99", "num_requests", "output_tokens", "duration_s", "errors", "preemptions",
                "warmup_s", "compile_s", "compilations", "compilations_during_run", "place_s", "peak_memory_bytes",
                "device_peak_bytes_in_use", "prompt_tokens", "cached_prompt_tokens", "prefill_tokens",
                "prefix_hit_rate", "expert_mode", "batch_shards", "devices", "prefill_devices", "decode_devices",
                "kv_transfers", "kv_transfer_bytes_per_request", "planner_kv_transfer_bytes_per_request", "isl",
                "osl", "output_digest", "tokens_match_reference")


def comm_rows(row: dict) -> list[dict]:
    """Flat per-phase communication rows of one measured configuration: HLO bytes by kind, scope, and planner."""
    out = []
    for phase in ("decode", "prefill"):
        hlo, plan = row["comm"][phase], row["planner_comm"][phase]
        layers = sum(v for s, v in hlo["by_scope"].items() if s in LAYER_SCOPES)
        sends = hlo["by_kind"]["collective-permute"]["wire_bytes"]
        entry = {k: row[k] for k in ("layout", "expert_mode", "chunk_size", "max_running")}
        entry.update({"phase": phase, "tokens_per_shard": row["comm_tokens"][phase],
                      "hlo_wire_bytes": hlo["wire_bytes"], "hlo_layer_bytes": layers, "hlo_send_bytes": sends,
                      "hlo_other_bytes": hlo["wire_bytes"] - layers - sends,
                      "planner_layer_bytes": plan["layers"], "planner_tensor_bytes": plan["tensor"],
                      "planner_expert_bytes": plan["expert"], "planner_send_bytes": plan["send"],
                      "layer_ratio": layers / plan["layers"] if plan["layers"] else None,
                      "weight_moves": "; ".join(hlo["weight_moves"])})
        for kind, v in hlo["by_kind"].items():
            entry[f"{kind}_count"] = v["count"]
            entry[f"{kind}_wire_bytes"] = v["wire_bytes"]
        entry["scopes"] = "; ".join(f"{s}={v:.0f}" for s, v in hlo["by_scope"].items())
        out.append(entry)
    return out


def write_tables(out: Path) -> dict[str, Path]:
    """results.csv (measured and failed configurations) and comm.csv from the folder's JSON lines."""
    rows, fails = read_rows(out / "results.jsonl"), read_rows(out / "failures.jsonl")
    paths = {"results_jsonl": out / "results.jsonl", "failures_jsonl": out / "failures.jsonl"}
    fields = ["status", *KEY_FIELDS, *_CSV_METRICS, "error"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({"status": "ok", **r})
        for r in fails:
            writer.writerow({"status": "error", **r})
    paths["results_csv"] = out / "results.csv"
    flat = [e for r in rows for e in comm_rows(r)]
    if flat:
        with (out / "comm.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        paths["comm_csv"] = out / "comm.csv"
        (out / "comm.md").write_text(comm_table(flat))
        paths["comm_md"] = out / "comm.md"
    return paths


def comm_table(flat: list[dict]) -> str:
    """A markdown table of `comm_rows`: bytes one device sends per step, compiled HLO beside the planner."""
    lines = ["| layout | expert mode | phase | tokens / shard | HLO layers (attn + moe) | planner layers "
             "(TP + expert) | ratio | HLO sends | planner sends | HLO outside layers | weights moved |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for e in flat:
        scopes = dict(part.split("=") for part in e["scopes"].split("; ") if part)
        layer = "+".join(f"{float(scopes.get(s, 0)):.0f}" for s in ("attn", "moe"))
        other = ", ".join(f"{s} {float(v):.0f}" for s, v in scopes.items()
                          if s not in LAYER_SCOPES and s != "ppermute" and float(v) > 0) or "-"
        ratio = "-" if e["layer_ratio"] is None else f"{e['layer_ratio']:.2f}"
        lines.append(f"| {e['layout']} | {e['expert_mode']} | {e['phase']} | {e['tokens_per_shard']} | "
                     f"{e['hlo_layer_bytes']:.0f} ({layer}) | {e['planner_layer_bytes']:.0f} "
                     f"({e['planner_tensor_bytes']:.0f}+{e['planner_expert_bytes']:.0f}) | {ratio} | "
                     f"{e['hlo_send_bytes']:.0f} | {e['planner_send_bytes']:.0f} | {other} | "
                     f"{e['weight_moves'] or 'no'} |")
    return "\n".join(lines) + "\n"
