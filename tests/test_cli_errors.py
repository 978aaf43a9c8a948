"""Every user mistake in `moejax generate` / `moejax plan` is one line `moejax: error: ...` on stderr, exit 2.

Run in-process (`moejax.cli.main`): `generate` mistakes are found on the host before JAX starts (the tests
make `jax.devices`, the model build and the engine fail loudly if they are reached), except a layout larger
than the devices, found right after JAX starts and before any model work. One subprocess run checks a fresh
process: the exit status, and that JAX's backend never started.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from moejax import cli
from moejax.config import configs_dir
from moejax.engine import engine as engine_lib
from moejax.inference import Model
from moejax.planner import cli as plan_cli

H100 = (configs_dir() / "hardware" / "h100-sxm.yaml").read_text()
FILES = {  # written under tmp_path; "{tmp}" in an argument list is that folder
    "hw_bad_yaml.yaml": "name: x\npeak_flops: {bf16: 1e15\n",
    "hw_list.yaml": "- 1\n- 2\n",
    "hw_missing.yaml": "name: x\npeak_flops: {bf16: 1.0e15}\nmemory_bytes: 8.0e10\n",
    "hw_negative.yaml": re.sub(r"memory_bandwidth: .*", "memory_bandwidth: -1.0e9", H100),
    "hw_nan.yaml": re.sub(r"nvlink_bandwidth: .*", "nvlink_bandwidth: .nan", H100),
    "hw_text.yaml": re.sub(r"memory_bandwidth: .*", "memory_bandwidth: fast", H100),
    "hw_unknown_key.yaml": H100 + "\ncolour: green\n",
    "eff_range.yaml": "compute: 2.0\n",
    "eff_unknown.yaml": "speed: 2.0\n",
    "model_missing.yaml": "family: mixtral\nvocab_size: 10\n",
    "model_bad.yaml": "family: [mixtral\n",
    "out_is_a_file": "",
    "ckpt_bad_json/config.json": "{",
    "ckpt_llama/config.json": json.dumps({"model_type": "llama"}),
    "ckpt_no_keys/config.json": json.dumps({"model_type": "mixtral"}),
    "ckpt_empty/.keep": "",
    "ckpt_tokenizer/config.json": json.dumps({  # a valid config, no tokenizer.json beside it
        "model_type": "mixtral", "vocab_size": 128, "hidden_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "intermediate_size": 32}),
}


@pytest.fixture
def tmp(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail loudly if a model is built or an engine made (anything that would place weights or compile)."""

    def refuse(*args, **kwargs):
        raise AssertionError("model build reached")

    monkeypatch.setattr(Model, "__init__", refuse)
    monkeypatch.setattr(engine_lib.Engine, "__init__", refuse)


@pytest.fixture
def no_jax(monkeypatch, no_model_work):
    """Also fail if JAX is asked for its devices (what starts a backend)."""

    def refuse(*args, **kwargs):
        raise AssertionError("JAX devices requested")

    monkeypatch.setattr(jax, "devices", refuse)


def _fails(capsys, argv, message, tmp=None):
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moejax: error: "), err
    assert re.search(message, lines[0]), lines[0]
    return lines[0]


# ---- generate ------------------------------------------------------------------------------------

GENERATE_BEFORE_JAX = [
    (["--devices", "0"], r"argument --devices: must be an integer in \[1, 1024\], got 0"),
    (["--devices=-3"], r"argument --devices: must be an integer in \[1, 1024\], got -3"),
    (["--devices", "5000"], r"argument --devices: must be an integer in \[1, 1024\], got 5000"),
    (["--devices", "eight"], r"argument --devices: expected an integer .*got 'eight'"),
    (["--model", "no-such-model"], r"no model config 'no-such-model'; built-in configs: \[.*'tiny-moe'"),
    (["--model", "{tmp}/ckpt_empty"], r"model config not found: .*ckpt_empty/config.json"),
    (["--model", "{tmp}/ckpt_bad_json"], r"model config '.*ckpt_bad_json': Expecting property name"),
    (["--model", "{tmp}/ckpt_llama"], r"model_type 'llama' is not supported"),
    (["--model", "{tmp}/ckpt_no_keys"], r"model config '.*ckpt_no_keys': missing key '\w+'"),
    (["--model", "{tmp}/model_missing.yaml"], r"model config '.*model_missing.yaml': .*missing \d+ required"),
    (["--model", "{tmp}/model_bad.yaml"], r"model config '.*model_bad.yaml': while parsing"),
    (["--model", "gpt-moe-1800b"], r"cannot run in moejax yet"),
    (["--layout", "TP3"], r"layout TP3 cannot run model tiny-moe: .*divisible by tensor \(3\)"),
    (["--layout", "EP3"], r"num_experts \(8\) must be divisible by expert \(3\)"),
    (["--layout", "XY2"], r"cannot parse layout 'XY2'"),
    (["--layout", "DP0"], r"Layout.data must be a positive integer, got 0"),
    (["--layout", "TP4MTP1EP2"], r"layout TP4MTP1EP2: MTP 1 x EP 2 must be a multiple of TP 4"),
    (["--layout", "TP2MTP0EP4"], r"layout 'TP2MTP0EP4': MTP must be a positive integer"),
    (["--prompt", "hello"], r"--prompt: a built-in config \(random weights\) has no tokenizer.json to encode text "
                            r"with; pass --prompt-ids$"),
    (["--model", "{tmp}/ckpt_tokenizer", "--prompt", "x"], r"ckpt_tokenizer has no tokenizer.json"),
    (["--prompt", "hi", "--prompt-ids", "1"], r"argument --prompt-ids: not allowed with argument --prompt"),
    (["--prompt-ids", ""], r"argument --prompt-ids: .*got '' \(an empty list\)"),
    (["--prompt-ids", ",,"], r"argument --prompt-ids: .*\(an empty list\)"),
    (["--prompt-ids", "1,a"], r"argument --prompt-ids: expected comma-separated integers, got 'a'"),
    (["--prompt-ids=-1,2"], r"argument --prompt-ids: each entry must be an integer in \[0, 2147483647\], got -1"),
    (["--prompt-ids", "1,2", "--prompt-ids", "1,512"], r"--prompt-ids: token id 512 \(prompt 1\) is out of "
                                                       r"vocabulary \(vocab_size=512\); allowed: \[0, 511\]"),
    (["--max-new-tokens", "0"], r"--max-new-tokens: max_new_tokens must be at least 1, got 0"),
    (["--max-new-tokens=-1"], r"--max-new-tokens: max_new_tokens must be at least 1, got -1"),
    (["--max-new-tokens", "1.5"], r"argument --max-new-tokens: invalid int value: '1.5'"),
    (["--max-new-tokens", "2147483648"], r"--max-new-tokens: max_new_tokens must be at most 2147483647"),
    (["--max-new-tokens", "2044"], r"the longest prompt \(5 tokens\) \+ 2044 new tokens = 2049 exceeds the "
                                   r"model's context limit \(max_position_embeddings=2048\)"),
    (["--temperature", "nan"], r"--temperature: temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], r"--temperature: temperature must be a finite number >= 0, got inf"),
    (["--temperature=-1"], r"--temperature: temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "1e39"], r"got 1e\+39; allowed: \[0, 3.4028235e\+38\]"),
    (["--top-k=-1"], r"--top-k: top_k must be at least 0, got -1"),
    (["--top-k", "2147483648"], r"--top-k: top_k must be at most 2147483647, got 2147483648"),
    (["--top-p", "0"], r"--top-p: top_p must lie in \(0, 1\], got 0.0"),
    (["--top-p", "1e-50"], r"--top-p: top_p must lie in \(0, 1\], got 1e-50; allowed: \[1.1754944e-38, 1\]"),
    (["--top-p", "1.5"], r"--top-p: top_p must lie in \(0, 1\], got 1.5"),
    (["--top-p", "nan"], r"--top-p: top_p must lie in \(0, 1\], got nan"),
    (["--sample-seed=-1"], r"--sample-seed: seed must be at least 0, got -1"),
    (["--sample-seed", "4294967295"], r"--sample-seed: seed must be at most 4294967295, got 4294967296.*"
                                      r"\(prompt 1 uses --sample-seed \+ 1\)"),
    (["--stop-token-ids", "512"], r"--stop-token-ids: stop token id 512 is out of vocabulary \(vocab_size=512\)"),
    (["--stop-token-ids", "x"], r"argument --stop-token-ids: expected comma-separated integers, got 'x'"),
    (["--chunk-size", "0"], r"argument --chunk-size: must be an integer in \[1, 2147483647\], got 0"),
    (["--page-size=-16"], r"argument --page-size: must be an integer in \[1, 2147483647\], got -16"),
    (["--chunk-size", "4096"], r"--chunk-size 4096 exceeds the model's context limit \(max_position_embeddings=2048\)"),
    (["--page-size", "100000"], r"--page-size 100000 exceeds the model's context limit"),
    (["--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
    (["--layout"], r"argument --layout: expected one argument \(see 'moejax generate --help'\)"),
    (["--enable-prefix-caching", "on"], r"unrecognized arguments: on"),
]


@pytest.mark.parametrize("args, message", GENERATE_BEFORE_JAX, ids=[" ".join(a) for a, _ in GENERATE_BEFORE_JAX])
def test_generate_mistake_is_one_line_before_jax_starts(args, message, tmp, no_jax, capsys):
    _fails(capsys, ["generate", *args], message, tmp)


def test_layout_larger_than_the_devices_suggests_devices_flag(no_model_work, monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # as in a fresh shell: --devices decides (restored afterwards)
    line = _fails(capsys, ["generate", "--layout", "DP16"],
                  r"layout DP16 needs 16 devices but only 8 cpu devices are available; pass --devices 16$")
    assert "XLA_FLAGS" not in line


def test_layout_larger_than_the_devices_when_xla_flags_fix_the_count(no_model_work, monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    _fails(capsys, ["generate", "--layout", "DP2TP4EP2"],
           r"needs 16 devices but only 8 cpu .*XLA_FLAGS already sets the CPU device count, so --devices has no "
           r"effect; unset it and pass --devices 16")


def test_layout_beyond_what_cpu_simulates(no_model_work, capsys):
    _fails(capsys, ["generate", "--layout", "DP2048"], r"needs 2048 devices .*simulates at most 1024 CPU devices")


def test_valid_flags_pass_every_check_and_reach_the_model_build(no_model_work):
    """The control for the tables above: the same checks let good values through (edges included)."""
    args = ["generate", "--prompt-ids", "0,511", "--prompt-ids", "7", "--max-new-tokens", "2046",
            "--temperature", "3e38", "--top-k", "2147483647", "--top-p", "1e-6", "--sample-seed", "4294967294",
            "--stop-token-ids", "", "--chunk-size", "2048", "--page-size", "1", "--devices", "8"]
    with pytest.raises(AssertionError, match="model build reached"):
        cli.main(args)


# ---- plan ----------------------------------------------------------------------------------------

PLAN = ["plan", "--model", "tiny-moe", "--hardware", "h100-sxm", "--devices", "8", "--no-plot", "--out", "{tmp}/out"]
PLAN_BAD = [
    (["--devices", "0"], r"argument --devices: must be an integer in \[1, 1000000\], got 0"),
    (["--devices=-8"], r"argument --devices: must be an integer in \[1, 1000000\], got -8"),
    (["--devices", "1000001"], r"argument --devices: must be an integer in \[1, 1000000\], got 1000001"),
    (["--devices", str(10**18)], r"argument --devices: must be an integer in \[1, 1000000\]"),
    (["--devices", "8.5"], r"argument --devices: expected an integer .*got '8.5'"),
    (["--target-tps-user", "nan"], r"argument --target-tps-user: must be a finite number >= 0, got 'nan'"),
    (["--target-tps-user", "inf"], r"argument --target-tps-user: must be a finite number >= 0, got 'inf'"),
    (["--target-tps-user=-1"], r"argument --target-tps-user: must be a finite number >= 0, got '-1'"),
    (["--target-tps-user", "fast"], r"argument --target-tps-user: expected a number, got 'fast'"),
    (["--batch-sizes="], r"argument --batch-sizes: expected comma-separated integers .*\(an empty list\)"),
    (["--batch-sizes", "0,4"], r"argument --batch-sizes: each entry must be an integer in \[1, 2147483647\], got 0"),
    (["--batch-sizes=-4"], r"argument --batch-sizes: each entry must be an integer in \[1, 2147483647\], got -4"),
    (["--batch-sizes", "1,,x"], r"argument --batch-sizes: expected comma-separated integers, got 'x'"),
    (["--chunk-sizes", ","], r"argument --chunk-sizes: .*\(an empty list\)"),
    (["--chunk-sizes", "256,0"], r"argument --chunk-sizes: each entry must be an integer in \[1, 2147483647\]"),
    (["--isl", "0"], r"argument --isl: must be an integer in \[1, 2147483647\], got 0"),
    (["--isl=-5"], r"argument --isl: must be an integer in \[1, 2147483647\], got -5"),
    (["--osl=-1"], r"argument --osl: must be an integer in \[1, 2147483647\], got -1"),
    (["--comm-overlap", "1.5"], r"argument --comm-overlap: must be a finite number in \[0, 1\], got '1.5'"),
    (["--comm-overlap=-0.1"], r"argument --comm-overlap: must be a finite number in \[0, 1\], got '-0.1'"),
    (["--comm-overlap", "nan"], r"argument --comm-overlap: must be a finite number in \[0, 1\], got 'nan'"),
    (["--microbatches", "0"], r"argument --microbatches: must be an integer in \[1, 2147483647\], got 0"),
    (["--min-layers-per-stage", "0"], r"argument --min-layers-per-stage: must be an integer in \[1, "),
    (["--top=-1"], r"argument --top: must be an integer in \[0, 2147483647\], got -1"),
    (["--precision", "fp2"], r"argument --precision: invalid choice: 'fp2'"),
    (["--model", "no-such-model"], r"no model config 'no-such-model'; built-in configs: \[.*'gpt-moe-1800b'"),
    (["--model", "{tmp}/model_missing.yaml"], r"model config '.*model_missing.yaml': .*missing \d+ required"),
    (["--hardware", "no-such-gpu"], r"hardware config 'no-such-gpu' not found; built-in: \[.*'h100-sxm'"),
    (["--hardware", "{tmp}/nope.yaml"], r"hardware config '.*nope.yaml' not found; built-in: \["),
    (["--hardware", "{tmp}"], r"hardware config '.*' is not a file; built-in: \["),
    (["--hardware", "{tmp}/hw_bad_yaml.yaml"], r"hardware config .*hw_bad_yaml.yaml is not valid YAML"),
    (["--hardware", "{tmp}/hw_list.yaml"], r"hw_list.yaml: expected a mapping of fields, got list"),
    (["--hardware", "{tmp}/hw_missing.yaml"], r"hw_missing.yaml: missing Hardware keys \['memory_bandwidth', "),
    (["--hardware", "{tmp}/hw_negative.yaml"], r"memory_bandwidth must be a finite number > 0, got -1000000000.0"),
    (["--hardware", "{tmp}/hw_nan.yaml"], r"nvlink_bandwidth must be a finite number > 0, got nan"),
    (["--hardware", "{tmp}/hw_text.yaml"], r"hw_text.yaml: could not convert string to float: 'fast'"),
    (["--hardware", "{tmp}/hw_unknown_key.yaml"], r"unknown Hardware keys \['colour'\]"),
    (["--efficiency", "{tmp}/nope.yaml"], r"efficiency file '.*nope.yaml' not found"),
    (["--efficiency", "{tmp}/eff_range.yaml"], r"efficiency file .*: Efficiency.compute must lie in \(0, 1.5\]"),
    (["--efficiency", "{tmp}/eff_unknown.yaml"], r"unexpected keyword argument 'speed'; known factors: \["),
    (["--out", "{tmp}/out_is_a_file"], r"--out .*out_is_a_file: cannot write the results"),
    (["--batch-sizes", ",".join(map(str, range(1, 5001)))],
     r"the sweep has [\d_]+ configurations \(\d+ layouts x 5000 batch sizes x 6 chunk sizes\), more than 200_000"),
    (["--expert-mode", "both"],
     r"argument --expert-mode/--ep-attention: expected one of \['dp_attention', 'replicated_attention'\], got 'both'"),
]


@pytest.mark.parametrize("args, message", PLAN_BAD, ids=[" ".join(a)[:60] for a, _ in PLAN_BAD])
def test_plan_mistake_is_one_line(args, message, tmp, capsys):
    _fails(capsys, [*PLAN, *args], message, tmp)
    assert not (tmp / "out").exists()  # refused before anything is written


def test_plan_needs_its_required_flags(capsys):
    _fails(capsys, ["plan", "--model", "tiny-moe", "--hardware", "h100-sxm"],
           r"the following arguments are required: --devices \(see 'moejax plan --help'\)")


def test_stand_alone_planner_entry_point_reports_the_same_way(capsys):
    assert plan_cli.main(["--model", "tiny-moe", "--hardware", "h100-sxm", "--devices", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: argument --devices: must be an integer in [1, 1000000], got 0")
    assert len(err.splitlines()) == 1


# ---- sweep and bench serve (more in tests/bench/test_cli.py) --------------------------------------

SWEEP = ["sweep", "--layouts", "DP1", "--out", "{tmp}/sweep_out", "--no-plot", "--no-progress"]
SPLIT = (r"layout TP4MTP1EP8 splits the MoE apart from attention, .*expert mode 'replicated_attention' replicates "
         r"attention over the expert axis: use 'dp_attention' or a layout without MTP")  # a split layout, replicated
SWEEP_BAD = [
    (["--layouts", ","], r"--layouts: no layout given in ','"),
    (["--max-running", "0"], r"argument --max-running: each entry must be an integer in \[1, 2147483647\], got 0"),
    (["--max-running", ","], r"argument --max-running: .*\(an empty list\)"),
    (["--microbatches", "0"], r"argument --microbatches: each entry must be an integer in \[1, "),
    (["--microbatches", "2"], r"--microbatches 2: no layout has pipeline stages \(DP1\); add a layout with PP > 1"),
    (["--layouts", "PP2", "--microbatches", "3", "--max-running", "8"],
     r"--max-running 8: no value is a multiple of the data factor x pipeline microbatch groups of any layout \(PP2\)"),
    (["--expert-mode", ","],
     r"--expert-mode: expected comma-separated modes from \['dp_attention', 'replicated_attention'\]"),
    (["--page-size", "0"], r"argument --page-size: must be an integer in \[1, 2147483647\], got 0"),
    (["--page-size", "5000"], r"--page-size 5000 exceeds the model's context limit \(max_position_embeddings=2048\)"),
    (["--input-len", "5:2"], r"argument --input-len: a length must be an integer >= 1 \(or a range LO:HI"),
    (["--output-len", "3:x"], r"argument --output-len: expected a length N or a range LO:HI of integers, got '3:x'"),
    (["--lengths-file", "{tmp}/lengths_dict.json"], r"--lengths-file: .*lengths_dict.json: expected a JSON list"),
    (["--lengths-file", "{tmp}/lengths_empty.json"], r"lengths_empty.json: no \(input_len, output_len\) entries"),
    (["--lengths-file", "{tmp}/lengths_cut.json"], r"lengths_cut.json is neither CSV .* nor valid JSON"),
    (["--lengths-file", "{tmp}"], r"lengths file '.*' is not a file"),
    (["--num-requests", "0"], r"argument --num-requests: must be an integer in \[1, 1000000\], got 0"),
    (["--concurrency", "0"], r"argument --concurrency: must be an integer in \[1, 1000000\], got 0"),
    (["--request-rate", "nan"], r"argument --request-rate: must be a finite number in \[1e-06, 1e\+09\], got 'nan'"),
    (["--efficiency", "{tmp}/out_is_a_file"], r"efficiency file .*out_is_a_file: expected a mapping of fields"),
    (["--hardware", "{tmp}/hw_list.yaml"], r"hw_list.yaml: expected a mapping of fields, got list"),
    (["--model", "{tmp}/model_bad.yaml"], r"model config '.*model_bad.yaml': while parsing"),
    (["--model", "{tmp}/ckpt_empty"], r"model config not found: .*ckpt_empty/config.json"),
    (["--model", "gpt-moe-1800b"], r"model gpt-moe-1800b cannot run in moejax yet"),
    (["--out", "{tmp}/out_is_a_file/sub"], r"--out .*/sub: .*out_is_a_file is a file, not a folder"),
    (["--reference-layout", "TP3"], r"--reference-layout: layout TP3 cannot run model tiny-moe"),
    (["--layouts", "TP4MTP1EP8,DP2", "--expert-mode", "replicated_attention"], r"--expert-mode: " + SPLIT),
    (["--layouts", "all", "--split-moe", "--expert-mode", "replicated_attention"],
     r"--split-moe: layout TP\d+MTP\d+\w* splits the MoE apart from attention"),
    (["--split-moe"], r"--split-moe adds the split layouts to --layouts all; with --layouts DP1 name them instead"),
    (["--weights-seed=-1"], r"argument --weights-seed: must be an integer in \[0, 2147483647\], got -1"),
    (["--seed=-1"], r"argument --seed: must be an integer in \[0, 4294967295\], got -1"),
    (["--decode-buckets", "all"], r"argument --decode-buckets: invalid choice: 'all'"),
    (["--max-prefill-seqs", "0"], r"argument --max-prefill-seqs: must be an integer in \[1, 2147483647\], got 0"),
    (["--warmup-requests=-1"], r"argument --warmup-requests: must be an integer in \[0, 1000000\], got -1"),
    (["--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
    (["--enable-prefix-caching", "maybe"],
     r"argument --enable-prefix-caching: expected comma-separated on / off \(e.g. off,on\), got 'maybe'"),
    (["--enable-prefix-caching", "on,"], r"argument --enable-prefix-caching: expected comma-separated on / off"),
    (["--shared-prefix-len=-1"], r"argument --shared-prefix-len: must be an integer in \[0, 1000000\], got -1"),
    (["--num-prefixes", "0"], r"argument --num-prefixes: must be an integer in \[1, 1000000\], got 0"),
    (["--num-prefixes", "3"], r"^moejax: error: --num-prefixes 3: give the prefixes' length with --shared-prefix-len"),
    (["--shared-prefix-len", "2010"], r"--shared-prefix-len / --input-len / --output-len: the workload's longest "
                                      r"request \(shared prefix 2010 \+ prompt \+ output = 2058 tokens\) exceeds"),
]

SERVE = ["bench", "serve", "--layout", "DP1"]
SERVE_BAD = [
    (["--output-len", "1"], r"--input-len / --output-len: every request needs at least 2 output tokens for TPOT"),
    (["--layout", "DP1,DP2"], r"--layout: give one layout, got 'DP1,DP2'; `moejax sweep` runs many"),
    (["--layout", ","], r"--layout: no layout given in ','"),
    (["--layout", "XX"], r"--layout: cannot parse layout 'XX'"),
    (["--out", "{tmp}"], r"--out .*: is a folder; give a file to append JSON lines to"),
    (["--out", "{tmp}/out_is_a_file/one.jsonl"], r"--out .*one.jsonl: .*out_is_a_file is a file, not a folder"),
    (["--max-running", "0"], r"argument --max-running: must be an integer in \[1, 2147483647\], got 0"),
    (["--chunk-size", "0"], r"argument --chunk-size: must be an integer in \[1, 2147483647\], got 0"),
    (["--chunk-size", "5000"], r"--chunk-size\(s\) 5000 exceeds the model's context limit"),
    (["--expert-mode", ","],
     r"--expert-mode: expected comma-separated modes from \['dp_attention', 'replicated_attention'\], got ','"),
    (["--expert-mode", "bogus"], r"--expert-mode: expected comma-separated modes"),
    (["--input-len", "2000", "--output-len", "100"], r"prompt \+ output = 2100 tokens\) exceeds the model's context"),
    (["--lengths-file", "{tmp}/lengths_empty.json"], r"lengths_empty.json: no \(input_len, output_len\) entries"),
    (["--hardware", "nope"], r"hardware config 'nope' not found"),
    (["--efficiency", "{tmp}/nope.yaml"], r"efficiency file '.*nope.yaml' not found"),
    (["--devices", "2000"], r"argument --devices: must be an integer in \[1, 1024\], got 2000"),
    (["--layout", "TP2PP2", "--microbatches", "0"], r"argument --microbatches: must be an integer in \[1, "),
    (["--num-requests", "1.5"], r"argument --num-requests: expected an integer in \[1, 1000000\], got '1.5'"),
    (["--concurrency", "x"], r"argument --concurrency: expected an integer in \[1, 1000000\], got 'x'"),
    (["--model", "{tmp}/ckpt_llama"], r"model_type 'llama' is not supported"),
    (["--layout", "TP4MTP1EP8", "--expert-mode", "replicated_attention"], r"--expert-mode: " + SPLIT),
    (["--shared-prefix-len", "x"], r"argument --shared-prefix-len: expected an integer in \[0, 1000000\], got 'x'"),
    (["--num-prefixes", "2", "--shared-prefix-len", "0"], r"--num-prefixes 2: give the prefixes' length"),
    (["--lengths-file", "{tmp}/lengths_long.json", "--shared-prefix-len", "8"],
     r"--shared-prefix-len / --lengths-file: .*\(shared prefix 8 \+ prompt \+ output = 2050 tokens\)"),
    (["--enable-prefix-caching", "off,on"], r"unrecognized arguments: off,on"),
]
LENGTHS = {"lengths_dict.json": "{}", "lengths_empty.json": "[]", "lengths_cut.json": "[[4, 4]",
           "lengths_long.json": "[[2000, 42]]"}


@pytest.mark.parametrize("args, message", SWEEP_BAD, ids=[" ".join(a)[:60] for a, _ in SWEEP_BAD])
def test_sweep_mistake_is_one_line(args, message, tmp, no_model_work, capsys):
    for name, text in LENGTHS.items():
        (tmp / name).write_text(text)
    _fails(capsys, [*SWEEP, *args], message, tmp)
    assert not (tmp / "sweep_out").exists()  # refused before anything is written


@pytest.mark.parametrize("args, message", SERVE_BAD, ids=[" ".join(a)[:60] for a, _ in SERVE_BAD])
def test_bench_serve_mistake_is_one_line(args, message, tmp, no_model_work, capsys):
    for name, text in LENGTHS.items():
        (tmp / name).write_text(text)
    _fails(capsys, [*SERVE, *args], message, tmp)


# ---- convert ---------------------------------------------------------------------------------------

CONVERT_BAD = [
    (["--hf", "{tmp}/nope"], r"--hf .*nope is not a directory"),
    (["--hf", "{tmp}/out_is_a_file"], r"--hf .*out_is_a_file is not a directory"),
    (["--hf", "{tmp}/ckpt_empty"], r"ckpt_empty is not a Hugging Face checkpoint: no config.json"),
    (["--hf", "{tmp}/ckpt_bad_json"], r"ckpt_bad_json/config.json"),
    (["--hf", "{tmp}/ckpt_llama"], r"model_type 'llama' is not supported"),
    (["--hf", "{tmp}/ckpt_tokenizer"], r"no \*.safetensors files in .*ckpt_tokenizer"),
    (["--out", ""], r"--out is empty; give the path of a new directory"),
    (["--out", "{tmp}/out_is_a_file"], r"--out .*out_is_a_file already exists; convert writes a new directory"),
    (["--out", "{tmp}/out_is_a_file/ckpt"], r"the parent directory .*out_is_a_file is a file, not a directory"),
    (["--out", "{tmp}/no/such/ckpt"], r"the parent directory .*no/such does not exist"),
    (["--dtype", "int8"], r"argument --dtype: invalid choice: 'int8'"),
    (["--hf"], r"argument --hf: expected one argument"),
]


@pytest.mark.parametrize("args, message", CONVERT_BAD, ids=[" ".join(a)[:60] for a, _ in CONVERT_BAD])
def test_convert_mistake_is_one_line(args, message, tmp, no_jax, capsys):
    _fails(capsys, ["convert", "--hf", "{tmp}/ckpt_tokenizer", "--out", "{tmp}/converted", *args], message, tmp)
    assert not list(tmp.glob("converted*"))


# ---- bench decode | gemm | gpu (their own modules' parsers) ----------------------------------------

BENCH_MODULES_BAD = [
    (["decode", "--isl", "0"], r"argument --isl: must be an integer in \[1, 65536\], got 0"),
    (["decode", "--osl", "1"], r"argument --osl: must be an integer in \[2, 65536\], got 1"),
    (["decode", "--batch-sizes", "1,x"], r"argument --batch-sizes: expected comma-separated integers"),
    (["decode", "--batch-sizes", ""], r"argument --batch-sizes: .*an empty list"),
    (["decode", "--model", "qwen3-30b-a3b-tiny"], r"is a qwen3_moe model; this benchmark builds a Mixtral-format"),
    (["decode", "--model", "{tmp}/model_bad.yaml"], r"model_bad.yaml"),
    (["decode", "--isl", "4000", "--osl", "200", "--model", "tiny-moe"], r"exceeds the model's max_position_emb"),
    (["decode", "--vs-vllm", "{tmp}/nope"], r"--vs-vllm .*nope' is not an executable python"),
    (["gemm", "--rows", "0"], r"argument --rows: each entry must be an integer in \[1, 4096\], got 0"),
    (["gemm", "--weight-mb", "-1"], r"argument --weight-mb: must be a finite number in"),
    (["gemm", "--weight-mb", "nan"], r"argument --weight-mb: must be a finite number in"),
    (["gemm", "--model", "no-such-model"], r"no-such-model"),
    (["gpu", "--prefill-len", "0"], r"argument --prefill-len: must be an integer in \[1,"),
    (["gpu", "--dtype", "int4"], r"argument --dtype: invalid choice: 'int4'"),
    (["gpu", "--model", "tiny-moe", "--layers", "5"], r"--layers 5 exceeds the model's 4 layers"),
    (["compile", "--batch", "0"], r"argument --batch: must be an integer in \[1,"),
    (["compile", "--layouts", "EP3"], r"num_experts|expert"),
    (["compile", "--layouts", ","], r"--layouts is empty"),
    (["compile", "--layouts", "TP4MTP1EP8", "--expert-mode", "replicated_attention"], SPLIT),
    (["compile", "--target", "h100-sxm", "--model", "tiny-moe", "--layouts", "DP1,TP4MTP1EP8", "--expert-mode",
      "replicated_attention"], SPLIT),  # found before the GPU compile packages are looked for
    (["compile", "--target", "a100"], r"--target: unknown GPU target 'a100'"),
    (["compile", "--model", "no-such-model"], r"no-such-model"),
]


@pytest.mark.parametrize("args, message", BENCH_MODULES_BAD, ids=[" ".join(a)[:60] for a, _ in BENCH_MODULES_BAD])
def test_bench_module_mistake_is_one_line(args, message, tmp, no_jax, capsys):
    _fails(capsys, ["bench", *args], message, tmp)


# ---- text prompts ----------------------------------------------------------------------------------

TOKENIZERS = {  # tokenizer.json beside a valid config (no weights: every mistake is found before they are read)
    "tok_bad": "{", "tok_empty": "", "tok_not_a_tokenizer": '{"a": 1}', "tok_binary": b"\xff\xfe\x00 garbage",
    "tok_dir": None, "tok_ok": "word-level",
}
TEXT_BAD = [
    (["--model", "{tmp}/tok_bad", "--prompt", "hi"], r"tok_bad/tokenizer.json: not a readable tokenizer file: EOF"),
    (["--model", "{tmp}/tok_empty", "--prompt", "hi"], r"tok_empty/tokenizer.json: not a readable tokenizer file"),
    (["--model", "{tmp}/tok_not_a_tokenizer", "--prompt", "hi"], r"tok_not_a_tokenizer/tokenizer.json: not a "
                                                                 r"readable tokenizer file"),
    (["--model", "{tmp}/tok_binary", "--prompt", "hi"], r"tok_binary/tokenizer.json: not a readable tokenizer file: "
                                                        r"stream did not contain valid UTF-8"),
    (["--model", "{tmp}/tok_dir", "--prompt", "hi"], r"tok_dir/tokenizer.json: not a file"),
    (["--model", "{tmp}/tok_ok", "--prompt", ""], r"text prompt '' is empty or only whitespace; give some text"),
    (["--model", "{tmp}/tok_ok", "--prompt", "hello", "--prompt", " \t"], r"text prompt ' \\t' is empty or only "),
    (["--model", "{tmp}/tok_ok", "--prompt", "hello " * 40], r"--max-new-tokens: the longest prompt \(41 tokens\) \+ "
                                                             r"32 new tokens = 73 exceeds the model's context limit"),
    (["--model", "{tmp}/ckpt_tokenizer", "--prompt", "hi"], r"ckpt_tokenizer has no tokenizer.json to encode text"),
    (["--prompt", "hi"], r"a built-in config \(random weights\) has no tokenizer.json"),
]


@pytest.mark.parametrize("args, message", TEXT_BAD, ids=[" ".join(a)[:60] for a, _ in TEXT_BAD])
def test_text_mistake_is_one_line_before_jax_starts(args, message, tmp, no_jax, capsys):
    from tests.hf_models import save_tokenizer

    config = json.dumps({**json.loads(FILES["ckpt_tokenizer/config.json"]), "max_position_embeddings": 64})
    for name, text in TOKENIZERS.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
        if text is None:
            (tmp / name / "tokenizer.json").mkdir()
        elif text == "word-level":
            save_tokenizer(tmp / name)
        elif isinstance(text, bytes):
            (tmp / name / "tokenizer.json").write_bytes(text)
        else:
            (tmp / name / "tokenizer.json").write_text(text)
    _fails(capsys, ["generate", *args], message, tmp)


# ---- both ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], r"the following arguments are required: command \(see 'moejax --help'\)"),
    (["serve"], r"argument command: invalid choice: 'serve'"),
])
def test_missing_or_unknown_command(argv, message, capsys):
    _fails(capsys, argv, message)


def test_debug_shows_the_traceback_then_the_line(tmp, no_jax, capsys):
    assert cli.main(["generate", "--top-p", "0", "--debug"]) == 2
    assert cli.main([*[a.replace("{tmp}", str(tmp)) for a in PLAN], "--hardware", "nope", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") >= 2
    last = [line for line in err.splitlines() if line.startswith("moejax: error:")]
    assert last == ["moejax: error: --top-p: top_p must lie in (0, 1], got 0.0; allowed: [1.1754944e-38, 1] (smaller "
                    "values underflow float32 to 0; any top_p at or below the top token's probability, e.g. 1e-6, "
                    "keeps only that token)",
                    f"moejax: error: hardware config 'nope' not found; built-in: "
                    f"{sorted(p.stem for p in (configs_dir() / 'hardware').glob('*.yaml'))} (or a path to a YAML file)"]


def test_fresh_process_exits_2_without_starting_jax():
    """As a user runs it: exit status 2, one stderr line, and JAX's backend never started (nothing compiled)."""
    script = ("import sys\nfrom moejax import cli\nrc = cli.main(sys.argv[1:])\n"
              "from jax._src import xla_bridge\nprint(rc, xla_bridge.backends_are_initialized())\nsys.exit(rc)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script, "generate", "--temperature", "nan"], capture_output=True,
                         text=True, env=env, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 2, out.stderr
    assert out.stdout.split() == ["2", "False"]
    assert out.stderr.splitlines() == ["moejax: error: --temperature: temperature must be a finite number >= 0, got "
                                       "nan; allowed: [0, 3.4028235e+38] (float32 overflows above)"]


# ---- Ctrl-C (convert and sweep: tests/checkpoint/test_convert.py, tests/bench/test_cli.py) ---------------

# Runs `moejax ARGS` with a marker printed once real work is under way: the engine's warm-up (compiling) for
# generate and bench serve, the planner's search (repeated, so it is still running) for plan.
UNDER_WAY = """
import sys
import moejax
from moejax.planner import cli as plan_cli
warmup, plan = moejax.Engine.warmup, plan_cli.plan
def marked_warmup(self, *args, **kwargs):
    print("work under way", file=sys.stderr, flush=True)
    return warmup(self, *args, **kwargs)
def marked_plan(*args, **kwargs):
    from moejax import interrupt
    print("work under way", file=sys.stderr, flush=True)
    while True:  # a plan that never ends; between plans, as after the real one, a lost ^C is raised again
        plan(*args, **kwargs)
        interrupt.check()
moejax.Engine.warmup, plan_cli.plan = marked_warmup, marked_plan
from moejax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [
    ["generate", "--layout", "DP2", "--max-new-tokens", "4"],
    ["bench", "serve", "--layout", "DP2", "--num-requests", "4", "--input-len", "4", "--output-len", "4",
     "--max-running", "4", "--chunk-size", "16"],
    ["plan", "--model", "tiny-moe", "--hardware", "h100-sxm", "--devices", "8", "--no-plot", "--out", "{tmp}/plan"],
], ids=["generate", "bench serve", "plan"])
def test_ctrl_c_is_one_line_and_status_130(argv, tmp_path):
    from tests.checkpoint.test_convert import interrupted_run

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = interrupted_run(["-c", UNDER_WAY, *argv], "work under way")
    assert run.returncode == 130, run.stdout
    assert "Traceback" not in run.stdout and run.stdout.splitlines()[-1] == "moejax: interrupted", run.stdout


# ---- help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, shown", [
    (["sweep"], ["--out OUT             output folder (resumed when it exists) (default:", "(default: pow2)",
                 "--page-size PAGE_SIZE\n                        KV cache page size (default: 16)"]),
    (["generate"], ["--max-new-tokens MAX_NEW_TOKENS\n                        default: 32",
                    "random-weight seed for config-name models (default: 0)"]),
    (["bench", "serve"], ["(default: 16)", "(default: auto)"]),
])
def test_help_shows_the_defaults_without_noise(argv, shown, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for part in shown:
        assert part in text, part
    assert "default: None" not in text and "default: False" not in text and "==SUPPRESS==" not in text
    assert "(default: 64) (default" not in text and "default 64 (default" not in text  # said once
