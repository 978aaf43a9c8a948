"""`python -m moejax.bench.disagg`: the disaggregated engine on a device split, its tokens against the aggregated
engine's and its KV bytes moved per request against the planner's."""

import pytest

from moejax.bench import disagg


@pytest.mark.slow  # 14 s; tests/engine/test_disagg.py checks tokens and bytes by default
def test_two_pairs_give_the_aggregated_tokens_and_the_planners_bytes(capsys):
    assert disagg.main(["--pairs", "TP2:DP2,DP2:TP2EP1PP2", "--devices", "8", "--num-requests", "6",
                        "--input-len", "8:40", "--output-len", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("tiny-moe: 6 requests, prompts 8-40 tokens")
    rows = [line.split() for line in lines[3:]]
    assert [r[:3] for r in rows] == [["TP2", "DP2", "2+2"], ["DP2", "TP2PP2", "2+4"]]
    for r in rows:
        assert r[3] == "yes" and r[4] == "6" and r[5] == r[6] and r[7] == "1.000", r


def test_bad_pairs_are_one_line(capsys):
    from moejax.args import run_main

    assert run_main(disagg.main, ["--pairs", "TP4:TP8"]) == 2
    assert "--pairs: TP4:TP8 needs 12 devices, --devices is 8" in capsys.readouterr().err
    assert run_main(disagg.main, ["--pairs", "TP4"]) == 2
    assert "is not PREFILL:DECODE" in capsys.readouterr().err
