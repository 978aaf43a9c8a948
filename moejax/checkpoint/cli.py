"""`moejax convert`: a Hugging Face checkpoint -> a moejax checkpoint (orbax) of the canonical tensors.

    moejax convert --hf DIR --out CKPT [--dtype bfloat16]

The result restores into any layout with `moejax.load(CKPT, layout=...)` or `moejax generate --model
CKPT`. The Hugging Face checkpoint is validated in full (names, shapes, file structure) before anything
is written, and --out must not exist; a mistake is one line `moejax: error: ...` and exit status 2.
A progress bar on stderr follows the bytes written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from moejax.cli import UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `convert` subcommand to an argparse subparsers object."""
    from moejax.checkpoint.store import DTYPES

    p = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint into a moejax (orbax) checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="new directory for the moejax checkpoint (must not exist)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="stored dtype (default: the Hugging Face checkpoint's own, when it uses one)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/inf weights instead of refusing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert; print a one-line summary on stdout; return the exit code."""
    from moejax.checkpoint import store
    from moejax.checkpoint.hf import HFSource

    out = Path(args.out)
    if os.path.lexists(out):
        raise UsageError(f"--out {out} already exists; convert writes a new directory (remove it or choose another)")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--out {out}: the parent directory {out.absolute().parent} does not exist")
    hf = Path(args.hf)
    if not hf.is_dir():
        raise UsageError(f"--hf {hf} is not a directory")
    # Validated in full here (a malformed checkpoint is a CheckpointError naming it); values as they are read.
    source = HFSource(hf, allow_nonfinite=args.allow_nonfinite)
    source.cfg.check_runtime_support()
    dtype = args.dtype or store.source_dtype(source)
    origin = {"kind": "huggingface", "path": str(hf.absolute()),
              "files": sorted({entry.file.name for entry in source.files.values()})}
    total = store.total_bytes(source.cfg, dtype)
    start = time.perf_counter()
    with _progress(total, enabled=not args.no_progress) as advance:
        store.save(out, source, source.cfg, dtype=dtype, origin=origin, progress=advance)
    print(f"wrote {out}: model {source.cfg.name or source.cfg.family}, {len(source.canonical)} tensors, "
          f"{total / 2**20:.1f} MiB as {dtype}, in {time.perf_counter() - start:.1f} s")
    return 0


class _progress:
    """A rich progress bar on stderr over `total` bytes; the context value is `advance(nbytes)`."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):
        if not self.enabled:
            return lambda nbytes: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            console=Console(file=sys.stderr))
        task = self.bar.add_task("write", total=self.total)
        self.bar.start()
        return lambda nbytes: self.bar.update(task, advance=nbytes)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
