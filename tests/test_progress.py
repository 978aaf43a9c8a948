"""Progress on stderr: live displays on a terminal, plain lines otherwise, nothing when disabled."""

import io

from rich.console import Console

from moejax.progress import Progress


def _run(enabled=True, terminal=False):
    file = io.StringIO()
    progress = Progress(enabled, Console(file=file, force_terminal=terminal, width=100))
    with progress.phase("reading weights", total=10) as advance:
        advance(4)
        advance(6)
    with progress.phase("compiling prefill"):
        pass
    return file.getvalue()


def test_plain_lines_when_not_a_terminal():
    lines = _run().splitlines()
    assert lines[0] == "moejax: reading weights ..." and lines[1].startswith("moejax: reading weights: done in ")
    assert lines[2] == "moejax: compiling prefill ..." and len(lines) == 4
    assert "\x1b" not in "".join(lines)  # no control codes in a log file


def test_a_terminal_gets_a_summary_line_per_phase():
    text = _run(terminal=True)
    assert "✓ reading weights" in text.replace("\x1b[0m", "").replace("\x1b[32m", "")
    assert "compiling prefill" in text


def test_disabled_prints_nothing():
    assert _run(enabled=False) == ""


def test_a_failed_phase_reports_no_completion():
    file = io.StringIO()
    progress = Progress(True, Console(file=file, force_terminal=False))
    try:
        with progress.phase("placing"):
            raise ValueError("no room")
    except ValueError:
        pass
    assert file.getvalue() == "moejax: placing ...\n"


def test_weight_loading_progress_counts_blocks_filled_in_place():
    """A checkpoint source fills blocks in place (`read_into`); the bar counts those values too, and a source
    without `read_into` still looks like one without it (weights.place then calls `read`)."""
    import numpy as np

    from moejax.cli import _Counted

    class InPlace:
        def read(self, name, layer, index):
            return np.zeros((2, 3))

        def read_into(self, name, layer, index, out):
            out[...] = 1

    class Plain:
        def read(self, name, layer, index):
            return np.zeros((4,))

    seen = []
    counted = _Counted(InPlace(), seen.append)
    out = np.zeros((5, 7))
    counted.read_into("embed", None, (), out)
    assert counted.read("embed", None, ()).shape == (2, 3) and seen == [35, 6] and out.all()
    assert not hasattr(_Counted(Plain(), seen.append), "read_into")
