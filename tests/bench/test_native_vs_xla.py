"""`moejax bench native`: each native kernel against its XLA fallback, at a few rows, both programs checked."""

import pytest

from moejax import native
from moejax.bench import native_vs_xla


@pytest.mark.skipif(not native.available(), reason="native kernels off or not built")
def test_every_kernel_is_timed_against_its_xla_path(capsys):
    rows = native_vs_xla.run(rows=(2,), reps=1)
    cases = [r["case"] for r in rows]
    assert len(cases) == len(native_vs_xla.KERNELS) + 1  # attention at two context lengths
    assert all(r["native_s"] > 0 and r["xla_s"] > 0 and r["xla_over_native"] > 0 for r in rows)
    assert "xla/native" in capsys.readouterr().out


def test_bad_kernel_name_is_one_line(capsys):
    from moejax.args import run_main

    assert run_main(native_vs_xla.main, ["--kernels", "moe,softmax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kernels: expected comma-separated names" in err[0]
