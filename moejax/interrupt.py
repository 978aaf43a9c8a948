"""Ctrl-C in the `moejax` command: one line `moejax: interrupted` and exit status 130, wherever it lands.

Python raises KeyboardInterrupt wherever the main thread happens to be, and a few places lose it: a
finalizer run by the garbage collector prints "Exception ignored in ..." with a traceback and goes on,
and code that records failures and carries on (a sweep's configuration) would record it as one. So
`handling()` also remembers that SIGINT came (`requested()`); `check()` turns that into a
KeyboardInterrupt at a safe point, and code that catches broad exceptions asks `requested()` before
treating one as a failure. A second Ctrl-C, while the first one's clean-up runs, ends the process at once
(same line, same status).

A signal arriving while the main thread is inside native code (an XLA compile) is handled when that
call returns: Python runs signal handlers between bytecodes only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 128 + signal.SIGINT  # what a shell reports for a process ended by SIGINT
MESSAGE = "moejax: interrupted"

_requested = False


def requested() -> bool:
    """True once SIGINT came during `handling()` (even if the KeyboardInterrupt it raised was lost)."""
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT came and its exception was lost on the way."""
    if _requested:
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    global _requested
    if _requested:  # the first one's clean-up is running: the user wants out now
        _exit_now()
    _requested = True
    raise KeyboardInterrupt


def _exit_now(*_) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"\n{MESSAGE}\n")
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _quiet_unraisable(previous):
    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # a lost ^C is `requested()`, not noise
            previous(unraisable)

    return hook


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Handle SIGINT as above inside the block (main thread only; elsewhere nothing changes).

    On leaving after an interrupt, a further SIGINT (say, while the interpreter waits for threads to end)
    exits at once; otherwise the previous handler is restored. Either way `requested()` is False again after it.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = False
    previous, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, _exit_now if _requested else previous)
        _requested = False  # the block's interrupt is handled; later `check()` calls (a library user's) start clean
