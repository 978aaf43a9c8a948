"""`moejax generate` end to end in a fresh process (8 simulated CPU devices)."""

import json
import os
import subprocess
import sys


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "moejax.cli", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_generate_json_matches_the_library(hf_checkpoints, models_1dev):
    path, _ = hf_checkpoints["mixtral"]
    stdout = _run("generate", "--model", str(path), "--layout", "DP2TP2EP2", "--prompt-ids", "1,5,9",
                  "--max-new-tokens", "6", "--json")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["tokens"] == models_1dev["mixtral"].generate([[1, 5, 9]], max_new_tokens=6)[0]
    assert result["ttft_s"] > 0 and result["tpot_s"] > 0 and result["devices"] == 8


def test_generate_microbatches_on_a_pipeline_layout(hf_checkpoints, models_1dev):
    """--microbatches 3 on 2 stages (groups wait for their turn): the library's greedy tokens."""
    path, _ = hf_checkpoints["mixtral"]
    prompts = [[1, 5, 9], [7, 2], [3, 3, 3, 8]]
    stdout = _run("generate", "--model", str(path), "--layout", "PP2", "--microbatches", "3", "--max-new-tokens", "5",
                  "--json", *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))])
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["tokens"] == models_1dev["mixtral"].generate(prompts, max_new_tokens=5)


def test_generate_default_runs_the_builtin_model():
    stdout = _run("generate", "--max-new-tokens", "4")
    assert "layout TP2EP2PP2" in stdout and "8 cpu devices" in stdout
    assert stdout.count("->") == 2


def test_generate_on_a_split_layout():
    """A split layout (attention TP4, the MoE EP4 over the same 4 devices): the 1-device library's greedy tokens
    of the built-in model (random weights, seed 0) and its prompts."""
    import moejax
    from moejax.cli import DEFAULT_PROMPTS

    stdout = _run("generate", "--layout", "TP4MTP1EP4", "--devices", "4", "--max-new-tokens", "5", "--json")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["layout"] == "TP4MTP1EP4" and result["devices"] == 4
    dp1 = moejax.Model.random(moejax.load_model_config("tiny-moe"), seed=0)
    assert result["tokens"] == dp1.generate([list(p) for p in DEFAULT_PROMPTS], max_new_tokens=5)


def test_generate_with_prefix_caching_gives_the_same_tokens():
    """Three prompts sharing a 40-token prefix (two full pages of 16): the later ones are served the prefix from
    the cache, and every prompt's greedy tokens are the library's without caching."""
    import moejax

    prefix = [(7 * i) % 500 for i in range(40)]
    prompts = [prefix + [1, 2], prefix + [3], prefix + [9, 9, 9]]
    stdout = _run("generate", "--layout", "DP1", "--devices", "1", "--max-new-tokens", "4", "--json",
                  "--enable-prefix-caching", *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))])
    result = json.loads(stdout.strip().splitlines()[-1])
    dp1 = moejax.Model.random(moejax.load_model_config("tiny-moe"), seed=0)
    assert result["tokens"] == dp1.generate(prompts, max_new_tokens=4)
    assert result["prompt_tokens"] == sum(map(len, prompts))
    assert result["cached_prompt_tokens"] > 0 and result["cached_prompt_tokens"] % 16 == 0  # whole pages


def test_generate_with_async_scheduling_gives_the_same_tokens():
    """--async-scheduling (the host packs step t + 1 while the device runs step t): greedy tokens equal the
    library's synchronous ones (seeded sampling: tests/engine/test_async.py)."""
    import moejax

    prompts = [[1, 5, 9, 13, 17], [3, 4], [8] * 20]
    args = ["generate", "--layout", "DP2EP2", "--devices", "4", "--max-new-tokens", "6", "--json",
            *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]]
    result = json.loads(_run(*args, "--async-scheduling").strip().splitlines()[-1])  # (seeded: tests/engine)
    dp1 = moejax.Model.random(moejax.load_model_config("tiny-moe"), seed=0)
    assert result["tokens"] == dp1.generate(prompts, max_new_tokens=6)


def test_version_and_python_dash_m(capsys):
    import importlib.metadata

    import pytest

    from moejax import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"moejax {importlib.metadata.version('moejax')}"
    out = subprocess.run([sys.executable, "-m", "moejax", "plan", "--devices", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("moejax: error: argument --devices")


def test_bench_modules_are_subcommands_with_their_own_help(capsys):
    import pytest

    from moejax import cli

    for name, flag in (("decode", "--no-hf"), ("gemm", "--weight-mb"), ("compile", "--layouts")):
        with pytest.raises(SystemExit) as done:
            cli.main(["bench", name, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: moejax bench {name} ") and flag in out
    assert cli.main(["bench", "gemm", "--bogus"]) == 2
    assert capsys.readouterr().err == ("moejax: error: unrecognized arguments: --bogus (see 'moejax bench gemm "
                                       "--help')\n")
