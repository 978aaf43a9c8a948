"""The few-row matmul roofline script runs and reports every (shape, rows) pair it was asked for."""

from moejax.bench import gemm


def test_gemm_roofline_reports_each_shape_and_row_count(capsys):
    assert gemm.main(["--model", "tiny-moe", "--rows", "1,3", "--weight-mb", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "streaming bandwidth" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 3 * 2  # gate/up, down, unembedding x rows 1 and 3
    for cols in rows:
        assert cols[-1].endswith("%") and 0 < float(cols[-1][:-1]) < 1000
