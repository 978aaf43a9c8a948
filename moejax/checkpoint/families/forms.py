"""Stored forms: how a Hugging Face checkpoint lays out one canonical tensor, and the view that reads it back.

A `Form` maps one stored tensor to one canonical tensor. The reader (`moejax.checkpoint.hf`) reads a
range of stored rows (first axis) at a time and converts it with `to_canonical`, always a view (reshape,
transpose, strided slice) of the rows read, so reading memory stays one piece of rows. `Experts` stacks a
per-expert form over the expert axis of a routed-expert tensor: one stored tensor per expert, or one
fused [E, ...] tensor whose expert matrices hold several canonical tensors (gate and up) side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Shape = tuple[int, ...]


class Form(NamedTuple):
    """A stored tensor as a function of the canonical one: its shape from the canonical shape, the conversion of a
    range of stored rows (first axis) to canonical, and the canonical axis those rows run along."""

    hf_shape: Callable[[Shape], Shape]
    to_canonical: Callable[[np.ndarray, Shape], np.ndarray]  # (stored rows, their canonical shape)
    row_axis: int | None  # canonical axis along the stored rows (None: read whole, a single stored row)
    row_unit: Callable[[Shape], int] = lambda c: 1  # stored rows per step along row_axis


class Experts(NamedTuple):
    """A routed-expert tensor [E, ...] read one expert at a time, each expert's matrix stored as `form`.

    Stored as one tensor per expert (the name holds "{expert}"), or fused: one [E, ...] tensor whose expert
    matrix is `part[1]` equal blocks along its first axis, this tensor being block `part[0]` (gate rows first
    then up rows: parts (0, 2) and (1, 2)).
    """

    form: Form
    part: tuple[int, int] = (0, 1)


class Stored(NamedTuple):
    """Where a canonical tensor is: a Hugging Face name template ("{layer}": the global layer index, "{expert}":
    the expert, for one tensor per expert) and its stored form."""

    name: str
    form: Form | Experts


SAME = Form(lambda c: c, lambda a, c: a, 0)
T = Form(lambda c: c[::-1], lambda a, c: a.T, 1)  # torch Linear [out, in] -> [in, out]
# torch Linear [N*H, D] (heads on the output rows) -> [D, N, H]; also [N*(nope+v), R] -> [R, N, nope+v] (MLA kv_b)
HEADS_IN = Form(lambda c: (c[1] * c[2], c[0]), lambda a, c: a.reshape(c[1], c[2], c[0]).transpose(2, 0, 1), 1,
                lambda c: c[2])
HEADS_OUT = Form(lambda c: (c[2], c[0] * c[1]), lambda a, c: a.T.reshape(c), 2)  # [D, N*H] -> [N, H, D]
FLAT = Form(lambda c: (int(np.prod(c)),), lambda a, c: a.reshape(c), 0, lambda c: int(np.prod(c[1:])))  # [N*H]
ROW = Form(lambda c: (1, *c), lambda a, c: a[0], None)  # [1, D] -> [D]


def interleaved(parity: int) -> Form:
    """[R, 2F] with two tensors' columns interleaved (gpt-oss gate_up: gate at even, up at odd columns) -> [R, F]."""
    return Form(lambda c: (c[0], 2 * c[1]), lambda a, c: a[:, parity::2], 0)


EVEN, ODD = interleaved(0), interleaved(1)


def interleaved_rows(parity: int) -> Form:
    """[2F, R] with two tensors' rows interleaved, transposed (gpt-oss MXFP4 gate_up: torch's [out, in]) -> [R, F]."""
    return Form(lambda c: (2 * c[1], c[0]), lambda a, c: a[parity::2].T, 1, lambda c: 2)


EVEN_ROWS, ODD_ROWS = interleaved_rows(0), interleaved_rows(1)


def stored_shape(stored: Stored, canonical: Shape) -> Shape:
    """The shape of the stored tensor (one expert's, for one tensor per expert) holding canonical shape `canonical`."""
    if isinstance(stored.form, Form):
        return tuple(stored.form.hf_shape(canonical))
    inner = tuple(stored.form.form.hf_shape(canonical[1:]))
    if "{expert}" in stored.name:
        return inner
    return (canonical[0], inner[0] * stored.form.part[1], *inner[1:])


def to_hf(form: Form, canonical: np.ndarray, out: np.ndarray) -> None:
    """Write `canonical` into the stored array `out` (`form`'s stored shape) where `form.to_canonical` reads it:
    the reader's view, inverted by sending every stored position's index through it."""
    where = form.to_canonical(np.arange(out.size).reshape(out.shape), canonical.shape)
    out.flat[np.asarray(where).ravel()] = canonical.ravel()  # in place, also in a block of a fused tensor
