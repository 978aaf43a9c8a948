"""Command-line arguments shared by every moejax command: the parser, value types and the one-line error.

A user mistake is a `UsageError` (a ValueError): `run_main` prints it as one line `moejax: error: ...` and exits
with status 2, for `moejax.cli.main` and for a module run on its own (`python -m moejax.bench.gemm`) alike.
Every sub-command's parser is a `Parser`: its errors raise instead of printing usage, and its help shows defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

from moejax.axes import DEPRECATED_EXPERT_MODES, EXPERT_MODES
from moejax.config import SERVING_DTYPES
from moejax.devices import MAX_SIMULATED_DEVICES

INT32_MAX = 2**31 - 1
EXIT_USAGE = 2
DEFAULT_LAYOUT = "TP2EP2PP2"  # generate's and bench serve's: valid for the built-in model on 8 devices


class UsageError(ValueError):
    """A mistake in the command line or in the files it names: one line on stderr, exit status 2."""


class _ShowDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is argparse.SUPPRESS or (isinstance(default, str | list | tuple)
                                                                        and not default)
        if nothing or "default" in text.lower() or not action.option_strings or action.nargs == 0:
            return text  # none, said already, a positional, or a flag (store_true: off unless given)
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class _RawDescriptionShowDefaults(argparse.RawDescriptionHelpFormatter, _ShowDefaults):
    """`_ShowDefaults` for parsers whose description is laid out by hand."""


_SHOW_DEFAULTS = {argparse.HelpFormatter: _ShowDefaults, argparse.RawDescriptionHelpFormatter:
                  _RawDescriptionShowDefaults}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a UsageError (printed by `main` as one line), not usage + exit, and
    whose help shows each option's default (subcommand parsers are of this class too)."""

    def __init__(self, *args, formatter_class=argparse.HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=_SHOW_DEFAULTS.get(formatter_class, formatter_class), **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and kwargs.get("default", None) is not None and kwargs["default"] is not False:
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def int_in(lo: int, hi: int = INT32_MAX):
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {value}")
        return value

    return parse


def real_in(lo: float, hi: float = math.inf):
    """An argparse type: a finite number in [lo, hi] (NaN and inf are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            allowed = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed}, got {text!r}")
        return value

    return parse


def expert_modes(text: str, flag: str = "--expert-mode") -> tuple[str, ...]:
    """Comma-separated expert modes (`moejax.axes.EXPERT_MODES`); the names before the rename ("data",
    "replicated") are read as today's. UsageError naming the flag otherwise."""
    modes = tuple(DEPRECATED_EXPERT_MODES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip())
    if not modes or any(m not in EXPERT_MODES for m in modes):
        raise UsageError(f"{flag}: expected comma-separated modes from {list(EXPERT_MODES)}, got {text!r}")
    return modes


def expert_mode(text: str) -> str:
    """argparse type: one expert mode (a deprecated name read as today's)."""
    mode = DEPRECATED_EXPERT_MODES.get(text, text)
    if mode not in EXPERT_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {list(EXPERT_MODES)}, got {text!r}")
    return mode


def int_list(lo: int, hi: int = INT32_MAX, allow_empty: bool = False):
    """An argparse type: comma-separated integers in [lo, hi]; at least one unless `allow_empty`."""

    def parse(text: str) -> list[int]:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers in [{lo}, {hi}], got {text!r} "
                                             f"(an empty list)")
        values = []
        for part in parts:
            try:
                values.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {part!r} in {text!r}") \
                    from None
            if not lo <= values[-1] <= hi:
                raise argparse.ArgumentTypeError(f"each entry must be an integer in [{lo}, {hi}], got {values[-1]} "
                                                 f"in {text!r}")
        return values

    return parse


def add_dtype(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """The `--dtype` flag of a command that serves a model: auto (the checkpoint's own, as vLLM's --dtype auto) or
    a name of `moejax.config.SERVING_DTYPES`; `resolved_dtype` turns it into a concrete one."""
    p.add_argument("--dtype", default=default, choices=["auto", *SERVING_DTYPES],
                   help="serving dtype; auto: the checkpoint's own (config.json torch_dtype; float32 when it "
                        "declares none, bfloat16 for an FP8 / INT8 checkpoint; a built-in config's dtype)")


def resolved_dtype(dtype: str, cfg) -> str:
    """`--dtype` as a concrete dtype for model config `cfg` (`moejax.config.resolve_dtype`), on the host before any
    device work; a UsageError naming the flag when auto cannot tell (a dtype moejax does not serve in)."""
    from moejax.config import resolve_dtype

    try:
        return resolve_dtype(dtype, cfg)
    except ValueError as err:
        raise UsageError(f"--dtype {dtype}: {err}") from err


def read_model_config(source: str):
    """`load_model_config(source)`, with malformed files reported as a UsageError naming `source`."""
    import yaml

    from moejax.config import load_model_config

    try:
        if os.path.isdir(source):
            from moejax.checkpoint import store

            if store.is_moejax_checkpoint(source):  # written by `moejax convert`: its config is in its metadata
                return store.read_config(source)
        return load_model_config(source)
    except FileNotFoundError:
        raise
    except KeyError as err:
        raise UsageError(f"model config {source!r}: missing key {err.args[0]!r}") from err
    except (TypeError, ValueError, AttributeError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise UsageError(f"model config {source!r}: {err}") from err


def check_context(cfg, sizes) -> None:
    """Refuse a size beyond the model's context limit: `sizes` are (flag, value) pairs, checked in order."""
    limit = cfg.max_position_embeddings
    for flag, value in sizes:
        if value > limit:
            raise UsageError(f"{flag} {value} exceeds the model's context limit (max_position_embeddings={limit})")


def check_devices(layout, devices: list, simulated: bool) -> None:
    """Refuse a layout larger than the devices at hand, saying what to change (before any model work)."""
    have, platform = len(devices), devices[0].platform
    if layout.size <= have:
        return
    if platform != "cpu":
        hint = f"choose a layout of at most {have} devices"
    elif layout.size > MAX_SIMULATED_DEVICES:
        hint = f"moejax simulates at most {MAX_SIMULATED_DEVICES} CPU devices"
    elif simulated:
        hint = f"pass --devices {layout.size}"
    else:
        hint = (f"XLA_FLAGS already sets the CPU device count, so --devices has no effect; unset it and pass "
                f"--devices {layout.size}")
    raise UsageError(f"layout {layout} needs {layout.size} devices but only {have} {platform} devices are "
                     f"available; {hint}")



def add_debug(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """The `--debug` flag (`run_main` shows the traceback of an error when it is in argv)."""
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def run_main(main, argv: list[str] | None = None) -> int:
    """Run `main(argv)` (default argv: sys.argv[1:]) as a command; return its exit status.

    A user mistake (ValueError, OSError: UsageError, CheckpointError, FileNotFoundError, config errors) is one
    line `moejax: error: ...` and status 2; Ctrl-C is one line and status 130. `--debug` in argv adds the
    traceback. A bug keeps its traceback, unless it is what Ctrl-C broke on its way out.
    """
    from moejax import interrupt

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    with interrupt.handling():
        try:
            status = main(argv)
            interrupt.check()  # a ^C that a finalizer or a callback swallowed still ends as one
            return status
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
        except (ValueError, OSError) as err:
            if not interrupt.requested():  # else: an error raised on the way out of an interrupted call
                if debug:
                    traceback.print_exc()
                print(f"moejax: error: {' '.join(str(err).split())}", file=sys.stderr)
                return EXIT_USAGE
        except Exception:
            if not interrupt.requested():
                raise
    print(interrupt.MESSAGE, file=sys.stderr)
    return interrupt.EXIT_INTERRUPTED


ASYNC_SCHEDULING_HELP = ("overlap the host's scheduling and packing of the next step with the device running the "
                         "last (vLLM's flag; ServeConfig.async_scheduling): the same tokens. Not with pipelined "
                         "microbatches")
