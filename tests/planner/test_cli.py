"""`moejax plan` end to end: the 64-GPU study of the 1.8T model, as JSON and as the printed summary."""

import json
import re
import subprocess
import sys

import pytest

from moejax.config import load_model_config
from moejax.mesh import Layout
from moejax.planner import cli

ARGS = ["--model", "gpt-moe-1800b", "--devices", "64", "--precision", "fp4", "--isl", "1024", "--osl", "256",
        "--target-tps-user", "20"]


def test_plan_json_is_compact_and_the_whole_plan_goes_to_a_file(tmp_path, capsys):
    assert cli.main(ARGS + ["--hardware", "gb200-nvl72", "--json", "--out", str(tmp_path), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    obj = json.loads(printed)
    assert set(obj) == {"summary", "ranking", "pareto", "files"} and len(printed) < 50_000
    assert obj["summary"]["count"]["layouts_total"] == 84 and len(obj["ranking"]) <= 15
    assert obj["pareto"] and all(p["feasible"] for p in obj["pareto"])
    full = json.loads((tmp_path / "plan.json").read_text())
    assert obj["files"]["plan_json"] == str(tmp_path / "plan.json")
    assert full["count"] == obj["summary"]["count"] and full["pareto"] == obj["pareto"]
    keys = {"layout", "chunk_size", "batch_size", "feasible", "reason", "mem_per_device_bytes", "ttft_s", "tpot_s",
            "tokens_per_s_per_device", "tokens_per_s_per_user"}
    assert len(full["configs"]) == full["count"]["configs"] and keys <= set(full["configs"][0])
    assert any(not c["feasible"] and c["reason"] for c in full["configs"]) or full["count"]["configs_infeasible"] == 0
    assert (tmp_path / "configs.csv").exists() and (tmp_path / "pareto.csv").exists()


def test_plan_json_full_prints_every_configuration(tmp_path, capsys):
    assert cli.main(ARGS + ["--hardware", "gb200-nvl72", "--json-full", "--out", str(tmp_path), "--no-plot"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {"rules", "count", "configs", "pareto", "ranking", "files"} <= set(obj)
    assert obj["count"]["configs"] == len(obj["configs"]) and not (tmp_path / "plan.json").exists()


def test_plan_summary_from_the_stand_alone_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moejax.planner.cli", *ARGS, "--hardware", "h100-sxm",
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "Rules:" in out and "TP divides the attention heads" in out
    assert "Layouts of 64 devices: 84, 79 valid, 5 rejected by the rules" in out
    infeasible = int(re.search(r"(\d+) do not", out).group(1))
    if infeasible > 3:
        assert f"  ... and {infeasible - 3} more infeasible configurations" in out
    assert "Best configuration per layout at >= 20 tokens/s/user" in out
    assert str(tmp_path / "pareto.png") in out
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_add_parser_wires_a_subcommand():
    import argparse

    parser = argparse.ArgumentParser(prog="moejax")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *ARGS, "--hardware", "h100-sxm", "--tp-within-domain"])
    assert args.func is cli.run and args.tp_within_domain and args.devices == 64



def _named(tmp_path, layouts: str, model: str = "qwen3-30b-a3b", devices: int = 8) -> list[str]:
    return ["--model", model, "--hardware", "h200", "--devices", str(devices), "--layouts", layouts, "--out",
            str(tmp_path), "--no-plot", "--batch-sizes", "8,64", "--chunk-sizes", "512", "--json-full"]


def test_plan_named_layouts_split_ones_included(tmp_path, capsys):
    """--layouts plans just those (an MTP factor needs no --split-moe); one the runtime refuses is a one-line error
    in the runtime's words (`Layout.validate`), one that does not parse in the parser's."""
    assert cli.main(_named(tmp_path, "TP4MTP1EP8, TP8MTP1EP8,DP8")) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {c["layout"] for c in obj["configs"]} == {"TP4MTP1EP8", "TP8MTP1EP8", "DP8"}
    assert obj["count"]["layouts_total"] == 3 and any("MTP" in rule for rule in obj["rules"])
    assert cli.main(_named(tmp_path, "TP4MTP1EP8,TP8EP8")) == 2
    assert "layout TP8EP8 uses 64 devices, not the 8 planned" in capsys.readouterr().err
    with pytest.raises(ValueError) as refused:  # gpt-oss-20b: 32 experts
        Layout.parse("TP8MTP1EP64").validate(load_model_config("gpt-oss-20b"))
    assert cli.main(_named(tmp_path, "TP8MTP1EP64", "gpt-oss-20b", 64)) == 2
    assert capsys.readouterr().err.strip() == f"moejax: error: --layouts: {refused.value}"
    assert cli.main(_named(tmp_path, "TP4MTPxEP8")) == 2
    assert "cannot parse layout 'TP4MTPxEP8'" in capsys.readouterr().err
