"""`moejax convert`: a Hugging Face checkpoint -> a moejax checkpoint (orbax) of the canonical tensors.

    moejax convert --hf DIR --out CKPT [--dtype bfloat16]

The result restores into any layout with `moejax.load(CKPT, layout=...)` or `moejax generate --model
CKPT`, with the checkpoint's tokenizer: its tokenizer and generation config files (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, generation_config.json, ...) are copied beside the
weights. The Hugging Face checkpoint is validated in full (names, shapes, file structure, a readable
tokenizer.json) before anything is written, and --out must not exist; a mistake is one line `moejax:
error: ...` and exit status 2. A progress bar on stderr follows the bytes written. Ctrl-C (exit status
130) leaves no partial output behind; a conversion killed outright leaves a staging directory
(OUT.moejax-tmp) that the next conversion to OUT removes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from moejax.args import UsageError
from moejax.tokenizer import load_tokenizer, text_files


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

    if not args.out.strip():
        raise UsageError("--out is empty; give the path of a new directory")
    out = Path(args.out)
    parent = out.absolute().parent
    if os.path.lexists(out):
        raise UsageError(f"--out {out} already exists; convert writes a new directory (remove it or choose another)")
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"--out {out}: the parent directory {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the parent directory {parent} is not writable")
    hf = Path(args.hf)
    if not hf.is_dir():
        raise UsageError(f"--hf {hf} is not a directory")
    if store.is_moejax_checkpoint(hf):
        raise UsageError(f"--hf {hf} is a moejax checkpoint already (written by moejax convert); load it as it is")
    # Validated in full here (a malformed checkpoint is a CheckpointError naming it); values as they are read.
    source = HFSource(hf, allow_nonfinite=args.allow_nonfinite)
    source.cfg.check_runtime_support()
    load_tokenizer(hf)  # a tokenizer.json that cannot be read is refused here, not at the first --prompt
    files = text_files(hf)
    dtype = args.dtype or store.source_dtype(source)  # of the float tensors: quantized ones are kept as stored
    origin = {"kind": "huggingface", "path": str(hf.absolute()),
              "files": sorted({entry.file.name for entry in source.files.values()})}
    total = store.total_bytes(source.cfg, dtype, source.quantization)
    start = time.perf_counter()
    with _progress(total, enabled=not args.no_progress) as advance:
        store.save(out, source, source.cfg, dtype=dtype, origin=origin, progress=advance, files=files)
    quantized = f" ({source.quantization.describe()} weights as stored)" if source.quantization else ""
    copied = f", with {', '.join(f.name for f in files)}" if files else ", no tokenizer files found"
    print(f"wrote {out}: model {source.cfg.name or source.cfg.family}, {len(source.canonical)} tensors, "
          f"{total / 2**20:.1f} MiB as {dtype}{quantized}{copied}, in {time.perf_counter() - start:.1f} s")
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
