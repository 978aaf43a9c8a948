"""Phases of a long command on stderr: a spinner or bar on a terminal, plain lines otherwise, nothing when quiet.

stdout carries only results (streamed tokens, JSON), so `moejax generate --json | jq` sees no progress; and a
log file (stderr not a terminal) gets one line when a phase starts and one when it ends, no control codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]  # advance(amount=1): move a phase's bar on
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: one per XLA compile
NOTED_COMPILE_S = 0.5  # compiles shorter than this (small helpers) are not worth a line


def _ignore(amount: float = 1) -> None:
    pass


class Progress:
    """Reports phases on `console` (default: a rich console on stderr).

    Args:
      enabled: False prints nothing (`--quiet`, or a process other than 0 in a multi-host run).
      console: a `rich.console.Console`; its `is_terminal` picks live displays or plain lines.
    """

    def __init__(self, enabled: bool = True, console=None):
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.enabled, self.console = enabled, console

    @contextmanager
    def phase(self, text: str, total: float | None = None, live: bool = True) -> Iterator[Advance]:
        """Show `text` while the block runs and its duration after; yields `advance(amount=1)` for a bar.

        Args:
          total: the bar's length in any unit (None: a spinner only).
          live: False keeps the terminal free of a live display (e.g. while tokens stream to stdout there).
        """
        if not self.enabled:
            yield _ignore
            return
        start = time.perf_counter()
        if self.console.is_terminal and live:
            with self._live(total) as bar:
                task = bar.add_task(text, total=total)
                yield lambda amount=1: bar.advance(task, amount)
            self.console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - start:.1f} s)[/]", highlight=False)
        else:
            self._line(f"moejax: {text} ...")
            yield _ignore
            self._line(f"moejax: {text}: done in {time.perf_counter() - start:.1f} s")

    @contextmanager
    def compiling(self, text: str) -> Iterator[None]:
        """A phase (`text`) with a note per program XLA compiles in it that takes `NOTED_COMPILE_S` or more:
        compiling is the long silent part of a first run, so each program compiled shows that it moves."""
        import jax

        compiled = []

        def on_event(event: str, seconds: float, **kwargs) -> None:
            if event == COMPILE_EVENT and seconds >= NOTED_COMPILE_S:
                compiled.append(seconds)
                self.note(f"XLA compiled program {len(compiled)} in {seconds:.1f} s")

        with self.phase(text):
            jax.monitoring.register_event_duration_secs_listener(on_event)
            try:
                yield
            finally:
                jax.monitoring.unregister_event_duration_listener(on_event)

    def note(self, text: str) -> None:
        """One line inside a phase (e.g. each program compiled); above the live display on a terminal."""
        if self.enabled:
            self._line(f"  {text}" if self.console.is_terminal else f"moejax:   {text}")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _live(self, total: float | None):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), TaskProgressColumn()]
        # transient: the finished bar gives way to the one-line summary; stdout is never redirected into it
        return Progress(*columns, TimeElapsedColumn(), console=self.console, transient=True, redirect_stdout=False,
                        redirect_stderr=False)
