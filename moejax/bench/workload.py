"""Serving workloads for measured runs: request lengths, arrivals, and the seeded requests they make.

A `Workload` fixes what a benchmark sends, independently of the layout it runs on, so that every
configuration of a sweep serves exactly the same requests:

- lengths: prompt and output tokens per request, each fixed (`Lengths(32)`) or uniform in a range
  (`Lengths(16, 64)`, both ends included), or (input, output) pairs read from a JSON or CSV file
  (`read_lengths`), used in file order and cycled;
- arrivals: closed loop at a fixed concurrency (a new request as soon as one finishes), or an open
  loop of Poisson arrivals at `request_rate` requests/s (optionally capped by `concurrency`);
- a warm-up phase of `warmup_requests` requests, served before the measured ones and left out of
  every figure (XLA:CPU sets up each fusion on its first real execution, docs/engine.md);
- shared prefixes (for prefix caching): with `shared_prefix_len` N > 0, request i's prompt is prefix
  i mod `num_prefixes` (N random tokens, the same in the warm-up and the measured requests: a system
  prompt the warm-up has already sent) followed by its own suffix of the input length drawn as above.

Everything is seeded: prompts (uniform random token ids) and lengths come from
`numpy.random.default_rng([seed, stream])`, stream 0 for the measured requests and 1 for the
warm-up, arrival gaps from stream 2 and the shared prefixes from stream 3, so one seed sends the same
requests in either arrival mode, and a workload without a shared prefix the same requests as before
prefixes existed. Outputs are greedy and run to `max_new_tokens` (no stop tokens), so the output lengths are
exactly the workload's and the tokens can be compared across layouts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MAX_REQUESTS = 1_000_000
MEASURED, WARMUP, ARRIVALS, PREFIXES = 0, 1, 2, 3  # rng streams


@dataclass(frozen=True)
class Lengths:
    """Token counts: `lo` when `hi` is None or equal, else uniform in [lo, hi] (integers, both included)."""

    lo: int
    hi: int | None = None

    def __post_init__(self):
        hi = self.lo if self.hi is None else self.hi
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.lo, hi)) or not 1 <= self.lo <= hi:
            given = repr(self.lo) if self.hi is None else f"{self.lo!r}:{self.hi!r}"
            raise ValueError(f"a length must be an integer >= 1 (or a range LO:HI with 1 <= LO <= HI), got {given}")
        object.__setattr__(self, "hi", hi)

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """'32' (fixed) or '16:64' (uniform, both ends included)."""
        parts = str(text).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected a length N or a range LO:HI of integers, got {text!r}") from None
        if len(values) not in (1, 2):
            raise ValueError(f"expected a length N or a range LO:HI, got {text!r}")
        return cls(*values)

    def sample(self, rng: np.random.Generator) -> int:
        return self.lo if self.lo == self.hi else int(rng.integers(self.lo, self.hi + 1))

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its prompt, how many tokens to make, and when (seconds after the start)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class Workload:
    """What a measured run sends (see the module docstring).

    Attributes:
        input_len: prompt tokens per request (ignored when `pairs` is given); after the shared prefix, if any.
        output_len: output tokens per request (ignored when `pairs` is given).
        pairs: (input, output) lengths, e.g. from `read_lengths`; used in order, cycled.
        pairs_source: where `pairs` came from (a file name; for the record only).
        num_requests: measured requests.
        warmup_requests: requests served first and left out of the figures; None: one per running
            slot of the engine (`max_running`).
        concurrency: most requests in flight; None: `max_running` in a closed loop, unbounded with a rate.
        request_rate: Poisson arrivals per second; None: closed loop (next request when one finishes).
        seed: seeds prompts, lengths and arrivals.
        shared_prefix_len: tokens of the prefix each prompt starts with (0: none); the prompt is the prefix
            followed by `input_len` (or the pair's input length) tokens of its own.
        num_prefixes: distinct shared prefixes, used round robin (request i takes prefix i mod num_prefixes).
    """

    input_len: Lengths = Lengths(32)
    output_len: Lengths = Lengths(16)
    pairs: tuple[tuple[int, int], ...] | None = None
    pairs_source: str | None = None
    num_requests: int = 32
    warmup_requests: int | None = None
    concurrency: int | None = None
    request_rate: float | None = None
    seed: int = 0
    shared_prefix_len: int = 0
    num_prefixes: int = 1

    def __post_init__(self):
        for name in ("num_requests", "warmup_requests", "concurrency", "shared_prefix_len", "num_prefixes"):
            value = getattr(self, name)
            lo = 0 if name in ("warmup_requests", "shared_prefix_len") else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not lo <= value <= MAX_REQUESTS):
                raise ValueError(f"Workload.{name} must be an integer in [{lo}, {MAX_REQUESTS}], got {value!r}")
        rate = self.request_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not math.isfinite(rate) or rate <= 0):
            raise ValueError(f"Workload.request_rate must be a finite number > 0 (requests/s), got {rate!r}")
        if self.pairs is not None:
            object.__setattr__(self, "pairs", _check_pairs(self.pairs, self.pairs_source or "pairs"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"Workload.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.num_prefixes > 1 and not self.shared_prefix_len:
            raise ValueError(f"Workload.num_prefixes {self.num_prefixes} needs a shared_prefix_len > 0 (the "
                             f"prefixes' length)")

    # ---- lengths ----------------------------------------------------------------------------

    def _lengths(self, i: int, rng: np.random.Generator) -> tuple[int, int]:
        if self.pairs is not None:
            return self.pairs[i % len(self.pairs)]
        return self.input_len.sample(rng), self.output_len.sample(rng)

    @property
    def max_total_len(self) -> int:
        """The longest prompt + output any request of this workload can have."""
        if self.pairs is not None:
            return self.shared_prefix_len + max(i + o for i, o in self.pairs)
        return self.shared_prefix_len + self.input_len.hi + self.output_len.hi

    @property
    def min_output_len(self) -> int:
        return min(o for _, o in self.pairs) if self.pairs is not None else self.output_len.lo

    def check(self, vocab_size: int, max_len: int) -> None:
        """Raise ValueError when a request would not fit the model's context (`max_len` positions)."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if self.max_total_len > max_len:
            prefix = f"shared prefix {self.shared_prefix_len} + " if self.shared_prefix_len else ""
            raise ValueError(f"the workload's longest request ({prefix}prompt + output = {self.max_total_len} tokens) "
                             f"exceeds the model's context limit (max_position_embeddings={max_len})")

    # ---- requests ---------------------------------------------------------------------------

    def requests(self, vocab_size: int, warmup: int | None = None) -> list[RequestSpec]:
        """The measured requests (or, with `warmup` = n, the n warm-up requests), seeded and in order.

        Measured requests carry their Poisson arrival offsets when `request_rate` is set (the first
        arrives at 0); warm-up requests and closed-loop requests carry 0. With a shared prefix, each prompt
        is `prefixes(vocab_size)[i % num_prefixes]` followed by its own tokens.
        """
        stream, count = (MEASURED, self.num_requests) if warmup is None else (WARMUP, warmup)
        rng = np.random.default_rng([self.seed, stream])
        gaps = np.random.default_rng([self.seed, ARRIVALS])
        prefixes = self.prefixes(vocab_size)
        out, t = [], 0.0
        for i in range(count):
            isl, osl = self._lengths(i, rng)
            prefix = prefixes[i % len(prefixes)] if prefixes else ()
            prompt = prefix + tuple(int(x) for x in rng.integers(0, vocab_size, isl))
            if self.request_rate is not None and stream == MEASURED:
                t += 0.0 if i == 0 else float(gaps.exponential(1.0 / self.request_rate))
            out.append(RequestSpec(prompt, osl, t if stream == MEASURED else 0.0))
        return out

    def prefixes(self, vocab_size: int) -> list[tuple[int, ...]]:
        """The `num_prefixes` shared prefixes of `shared_prefix_len` random tokens each (none without one)."""
        if not self.shared_prefix_len:
            return []
        rng = np.random.default_rng([self.seed, PREFIXES])
        tokens = rng.integers(0, vocab_size, (self.num_prefixes, self.shared_prefix_len))
        return [tuple(int(x) for x in row) for row in tokens]

    def warmup_count(self, max_running: int) -> int:
        return max_running if self.warmup_requests is None else self.warmup_requests

    def in_flight(self, max_running: int) -> int | None:
        """Most requests in flight: `concurrency`, else `max_running` in a closed loop, else unbounded (None)."""
        if self.concurrency is not None:
            return self.concurrency
        return None if self.request_rate is not None else max_running

    # ---- identity ---------------------------------------------------------------------------

    def describe(self) -> dict:
        """A JSON-able description (what the sweep records beside each measurement); the prefix fields only
        with a shared prefix, so that a workload without one keeps the description (and id) it always had."""
        d = asdict(self)
        d["input_len"], d["output_len"] = str(self.input_len), str(self.output_len)
        if not self.shared_prefix_len:
            d.pop("shared_prefix_len"), d.pop("num_prefixes")
        if self.pairs is not None:
            d.pop("input_len"), d.pop("output_len")
            d["pairs"] = len(self.pairs)
            d["pairs_sha1"] = hashlib.sha1(json.dumps(self.pairs).encode()).hexdigest()[:12]
        return d

    @property
    def workload_id(self) -> str:
        """A short hash of `describe()`: equal ids send identical requests."""
        return hashlib.sha1(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]

    def mean_lengths(self, vocab_size: int) -> tuple[int, int]:
        """(isl, osl) of the measured requests, rounded means (the planner's request shape)."""
        reqs = self.requests(vocab_size)
        return (max(1, round(float(np.mean([len(r.prompt) for r in reqs])))),
                max(1, round(float(np.mean([r.max_new_tokens for r in reqs])))))


def _check_pairs(pairs, source: str) -> tuple[tuple[int, int], ...]:
    out = []
    for n, pair in enumerate(pairs, 1):
        try:
            isl, osl = pair
        except (TypeError, ValueError):
            raise ValueError(f"{source}: entry {n}: expected (input_len, output_len), got {pair!r}") from None
        for name, v in (("input_len", isl), ("output_len", osl)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{source}: entry {n}: {name} must be an integer >= 1, got {v!r}")
        out.append((int(isl), int(osl)))
    if not out:
        raise ValueError(f"{source}: no (input_len, output_len) entries")
    return tuple(out)


def read_lengths(path: str | Path) -> tuple[tuple[int, int], ...]:
    """(input_len, output_len) pairs from a file.

    JSON: a list of `{"input_len": I, "output_len": O}` objects or of `[I, O]` pairs. CSV: a header
    row naming `input_len` and `output_len` (other columns are ignored), one request per row.
    Raises FileNotFoundError or ValueError naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lengths file {str(path)!r} " + ("is not a file" if path.exists() else "not found"))
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and not {"input_len", "output_len"} <= set(rows[0]):
            raise ValueError(f"{path}: the CSV header must name input_len and output_len, got {list(rows[0])}")
        pairs = []
        for n, row in enumerate(rows, 2):
            try:
                pairs.append((int(row["input_len"]), int(row["output_len"])))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {n}: expected integers, got {row['input_len']!r}, "
                                 f"{row['output_len']!r}") from None
        return _check_pairs(pairs, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is neither CSV (by its suffix) nor valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of requests, got {type(data).__name__}")
    pairs = []
    for n, item in enumerate(data, 1):
        if isinstance(item, dict):
            if not {"input_len", "output_len"} <= set(item):
                raise ValueError(f"{path}: entry {n}: expected keys input_len and output_len, got {sorted(item)}")
            item = (item["input_len"], item["output_len"])
        pairs.append(item)
    return _check_pairs(pairs, str(path))
