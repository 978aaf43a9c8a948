"""In-flight batching scheduler: who runs this step, with how many tokens, on which pages.

Pure host logic (no JAX), so its policy is cheap and testable on its own.

Requests are split into `microbatches` groups (one per pipeline stage by default, see
`moejax.engine`): each running request belongs to one data group and one microbatch group, and an
engine step (a pipeline tick) schedules one microbatch group, `schedule(m)`. A request whose work
is still in the pipeline (`Request.in_flight`, set by the engine) is not scheduled again until it
has left. With asynchronous scheduling the engine advances a request as soon as its work is dispatched
(`Request.pending`: tokens sampled on device, not read yet), so it is scheduled again at once, except when its
pending token is its last (max_new_tokens). Policy, per engine step and per data group, within the microbatch group:

- Running requests are visited oldest first. One with a single uncomputed token decodes (one
  token, in the decode batch); one with more is prefilling and takes a chunk of up to
  `chunk_size` tokens in one of `max_prefill_seqs` prefill rows (so a group prefills at most
  max_prefill_seqs * chunk_size tokens per step: the static prefill shape).
- A request's sequence is prompt + outputs so far; a chunk that reaches its end makes a token.
  After a preemption the whole sequence is recomputed as one long prompt, and the seeded sampler
  keys on the output count, so outputs are the same as without the preemption.
- Pages are taken just before the tokens that need them (a data group's pool serves all its
  microbatch groups). When a data group runs out, its youngest running request is preempted
  (pages freed, back to the waiting queue to be recomputed later), in whichever microbatch group
  and even with work in flight (that work is dropped when it leaves the pipeline; its KV writes
  land before any new owner of the pages reaches the same stage); if that is the request asking,
  it waits. The oldest request therefore always progresses.
- Waiting requests are admitted first come, first served (no overtaking) into the microbatch group
  being scheduled, while a data group has a free slot in it, a free prefill row and the pages for
  the first chunk; a request goes to the data group with the fewest running requests in that
  microbatch group. No admission in a step that preempted (no thrash).

Prefix caching (`prefix_caching`; the keys, references and eviction are `PageAllocator`'s): a request is
admitted with the longest cached chain of its sequence's full pages in a data group, taken by reference, at
most (len(tokens) - 1) // page_size pages so at least one token is computed and a token is sampled; its
`num_computed` starts after them, so those prefill chunks are skipped. Admission prefers the data group with
the longest such prefix among those with room (ties: the rule above). `register` enters a request's full pages
up to its computed tokens once a token it sampled is known finite (the engine calls it), so a page whose KV a
finite logit has not read is never served to another request. A preempted request's cached pages stay
evictable, and its re-admission takes them back while they are still cached.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from moejax.kv_cache import PageAllocator, pages_for

RequestId = str | int  # kept and compared as given


class TokenTimes:
    """TTFT and TPOT of anything with `arrival_s` and `token_times_s` (the engine's requests, the
    benchmarks' records): one definition of the serving metrics."""

    arrival_s: float
    token_times_s: list[float]

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (arrival to the first token), seconds."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, seconds."""
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass
class Request(TokenTimes):
    """Host state of one request. `tokens` is prompt + outputs; KV exists for tokens[:num_computed].

    `page_table`, when given (zeroed; the engine gives one of its max pages per sequence), is kept equal to
    `pages` zero-padded by the scheduler as pages come and go, so a batch row copies it as is.
    `sampling_row` is the engine's packed per-request sampling parameters (see `moejax.engine`).
    """

    request_id: RequestId
    order: int  # arrival order: FCFS and "youngest" are decided by it
    prompt_len: int
    tokens: list[int]
    params: object  # SamplingParams
    seed: int
    group: int = -1  # data group while running, else -1
    microbatch: int = -1  # microbatch group while running, else -1
    in_flight: bool = False  # work of it is in a pipeline (set and cleared by the engine)
    # Asynchronous scheduling: the last `pending` tokens were sampled by calls whose ids the host has not read yet
    # (placeholders here); the last of them is in slot `feed_slot` of the device's feed buffer (else -1).
    pending: int = 0
    feed_slot: int = -1
    pages: list[int] = field(default_factory=list)
    cache_entries: list[int] = field(default_factory=list)  # prefix-cache entry ids of pages[:len(cache_entries)]
    num_computed: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # what went wrong, when finish_reason is "error"
    num_preemptions: int = 0
    admitted_len: int = 0  # len(tokens) when last admitted
    kv_bytes_moved: int = 0  # disaggregated serving: KV bytes moved to the decode side (again after a preemption)
    arrival_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)
    finished_s: float | None = None
    page_table: np.ndarray | None = None  # int32 [max pages per sequence]
    sampling_row: np.ndarray | None = None

    @property
    def output_ids(self) -> list[int]:
        """The tokens made so far that the host has read (never a pending placeholder)."""
        return self.tokens[self.prompt_len:len(self.tokens) - self.pending]

    def drop_pending(self) -> None:
        """Forget the tokens not read yet (a preemption recomputes them; a finished request never had them)."""
        if self.pending:
            del self.tokens[len(self.tokens) - self.pending:]
            self.num_computed = min(self.num_computed, len(self.tokens))
            self.pending, self.feed_slot = 0, -1

    @property
    def num_output(self) -> int:
        """Tokens made so far, pending ones included (what the scheduler plans with)."""
        return len(self.tokens) - self.prompt_len


@dataclass
class Work:
    """Tokens tokens[start:start + num] of `req` computed this step; `samples`: the last one makes a token.

    `epoch`: the request's preemption count when scheduled; work of an earlier epoch (preempted while in a
    pipeline) is dropped when it comes back."""

    req: Request
    start: int
    num: int
    samples: bool
    epoch: int = 0


@dataclass
class Plan:
    prefill: list[list[Work]]  # per data group, at most max_prefill_seqs each
    decode: list[list[Work]]  # per data group
    preempted: list[Request]
    admitted: list[Work] = field(default_factory=list)  # the first work of each request admitted (start: cached)

    @property
    def works(self):
        for per_group in (self.prefill, self.decode):
            for works in per_group:
                yield from works


class Scheduler:
    """FCFS in-flight batching with chunked prefill and recompute preemption over paged KV.

    Args:
      allocator: the page allocator (one pool per data group).
      page_size: tokens per page.
      slots_per_group: max running requests per data group and microbatch group.
      chunk_size: most prefill tokens per request per step (one prefill row).
      max_prefill_seqs: prefill rows per step per data group.
      microbatches: microbatch groups.
      prefix_caching: admit requests with their longest cached prefix and `register` pages (module docstring).
    """

    def __init__(self, allocator: PageAllocator, page_size: int, slots_per_group: int, chunk_size: int,
                 max_prefill_seqs: int, microbatches: int = 1, prefix_caching: bool = False,
                 prefill_only: bool = False, requeue=None):
        self.alloc = allocator
        self.prefill_only = prefill_only  # never schedule a decode: a request with one token left waits (`ready`)
        self.requeue = requeue or self.add  # where a preempted request goes (disaggregated: the prefill side)
        self.prefix_caching = prefix_caching
        self.page_size = page_size
        self.slots = slots_per_group
        self.microbatches = microbatches
        self.chunk_size = chunk_size
        self.max_prefill_seqs = max_prefill_seqs
        self.waiting: list[Request] = []  # sorted by arrival order
        self.running: list[list[Request]] = [[] for _ in range(allocator.num_groups)]  # each sorted by order
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=lambda r: r.order)

    def remove(self, req: Request) -> None:
        """Take a request out (finished or aborted) and free its pages."""
        if req.group >= 0:
            self.running[req.group].remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def occupancy(self) -> list[int]:
        """Running requests in each microbatch group (all data groups together)."""
        counts = [0] * self.microbatches
        for running in self.running:
            for req in running:
                counts[req.microbatch] += 1
        return counts

    def schedule(self, microbatch: int = 0) -> Plan:
        """The work of microbatch group `microbatch` for this step (and admissions into it)."""
        groups = range(self.alloc.num_groups)
        plan = Plan([[] for _ in groups], [[] for _ in groups], [])
        for g in groups:
            self._schedule_running(g, microbatch, plan)
        if not plan.preempted:
            self._admit(microbatch, plan)
        return plan

    # ---- internals ------------------------------------------------------------------------------

    def _schedule_running(self, g: int, m: int, plan: Plan) -> None:
        running = self.running[g]
        i = 0
        while i < len(running):
            req = running[i]
            if req.microbatch != m or req.in_flight or (req.pending and req.num_output >= req.params.max_new_tokens):
                i += 1  # in a pipeline, or its last token is on its way (asynchronous scheduling)
                continue
            remaining = len(req.tokens) - req.num_computed
            decode = remaining == 1
            if decode and self.prefill_only:
                if self._prefilled(req):  # it sampled here: it waits to be handed to the decode side
                    i += 1
                    continue
                decode = False  # the sequence's last token, computed here as a chunk of one (it samples)
            if not decode and len(plan.prefill[g]) == self.max_prefill_seqs:
                i += 1
                continue
            num = 1 if decode else min(remaining, self.chunk_size)
            if not self.grow(req, req.num_computed + num):
                # The youngest, in flight or not (never one already scheduled: those are older than req),
                # so the oldest request always progresses.
                victim = running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is req:
                    break
                continue
            work = Work(req, req.num_computed, num, req.num_computed + num == len(req.tokens), req.num_preemptions)
            if decode:
                plan.decode[g].append(work)
            else:
                plan.prefill[g].append(work)
            i += 1

    def register(self, req: Request, upto: int | None = None) -> None:
        """Enter `req`'s full pages up to position `upto` (default: its computed tokens) into the prefix cache
        (no-op without caching).

        Call it only when a token the request sampled at position `upto` is finite: its logits read the KV of
        every earlier position, so those pages hold no NaN."""
        if not self.prefix_caching or req.group < 0:
            return
        ps, entries = self.page_size, req.cache_entries
        for i in range(len(entries), (req.num_computed if upto is None else upto) // ps):
            parent = entries[-1] if entries else PageAllocator.ROOT
            entries.append(self.alloc.register(req.group, parent, tuple(req.tokens[i * ps:(i + 1) * ps]),
                                               req.pages[i]))

    def _admit(self, m: int, plan: Plan) -> None:
        in_m = [sum(r.microbatch == m for r in running) for running in self.running]
        while self.waiting:
            req = self.waiting[0]
            blocks = self._cacheable_blocks(req)
            best = None
            for g in range(self.alloc.num_groups):
                if in_m[g] >= self.slots or len(plan.prefill[g]) == self.max_prefill_seqs:
                    continue
                hits = self.alloc.match(g, blocks) if blocks else []
                start = len(hits) * self.page_size
                num = min(len(req.tokens) - start, self.chunk_size)
                unreferenced = sum(self.alloc.refcount(g, page) == 0 for _, page in hits)  # no longer evictable
                if self.alloc.num_free(g) - unreferenced < pages_for(start + num, self.page_size) - len(hits):
                    continue
                rank = (-len(hits), in_m[g], -self.alloc.num_free(g))
                if best is None or rank < best[0]:
                    best = (rank, g, hits, num)
            if best is None:
                return  # first come, first served: nobody overtakes the head of the queue
            _, g, hits, num = best
            self.waiting.pop(0)
            req.group, req.microbatch = g, m
            req.admitted_len = len(req.tokens)
            in_m[g] += 1
            req.pages = [page for _, page in hits]
            req.cache_entries = [entry for entry, _ in hits]
            self.alloc.share(g, req.pages)
            if req.page_table is not None:
                req.page_table[:len(hits)] = req.pages
            req.num_computed = start = len(hits) * self.page_size
            self.grow(req, start + num)
            bisect.insort(self.running[g], req, key=lambda r: r.order)
            work = Work(req, start, num, start + num == len(req.tokens), req.num_preemptions)
            plan.prefill[g].append(work)
            plan.admitted.append(work)

    def ready(self) -> list[Request]:
        """Running requests that computed their whole sequence as admitted and sampled a token, oldest first (a
        `prefill_only` scheduler's finished prefills, to be handed over)."""
        return sorted((r for running in self.running for r in running if self._prefilled(r)), key=lambda r: r.order)

    @staticmethod
    def _prefilled(req: Request) -> bool:
        """Its whole sequence as admitted computed, and a token sampled after it."""
        return len(req.tokens) - req.num_computed == 1 and len(req.tokens) > req.admitted_len

    def find_place(self, req: Request) -> tuple[int, int] | None:
        """Where `place` would put `req`: the (data group, microbatch group) with the fewest running requests among
        those with a free slot and the pages of its whole sequence; None when none has both."""
        best = None
        for g in range(self.alloc.num_groups):
            counts = [sum(r.microbatch == m for r in self.running[g]) for m in range(self.microbatches)]
            m = min(range(self.microbatches), key=counts.__getitem__)
            if counts[m] >= self.slots or self.alloc.num_free(g) < pages_for(len(req.tokens), self.page_size):
                continue
            rank = (counts[m], len(self.running[g]), -self.alloc.num_free(g))
            if best is None or rank < best[0]:
                best = (rank, g, m)
        return None if best is None else best[1:]

    def place(self, req: Request, group: int, microbatch: int) -> None:
        """Put `req` (not held by this scheduler; its KV computed up to its last token elsewhere) straight into
        running in data group `group` and microbatch group `microbatch` (`find_place`), with the pages of its
        sequence, which its KV is then copied into."""
        req.group, req.microbatch, req.pages, req.cache_entries = group, microbatch, [], []
        if not self.grow(req, len(req.tokens)):
            raise RuntimeError(f"no pages for request {req.request_id!r} in data group {group}: use find_place")
        bisect.insort(self.running[group], req, key=lambda r: r.order)

    def holds(self, req: Request) -> bool:
        """Whether `req` is waiting or running here."""
        running = self.running[req.group] if 0 <= req.group < len(self.running) else []
        return any(r is req for r in self.waiting) or any(r is req for r in running)

    def _cacheable_blocks(self, req: Request) -> list[tuple]:
        """The tokens of each full page a cache hit may serve: never the last token, which must be computed."""
        if not self.prefix_caching:
            return []
        ps = self.page_size
        return [tuple(req.tokens[i * ps:(i + 1) * ps]) for i in range((len(req.tokens) - 1) // ps)]

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Give running `req` the pages to hold `num_tokens` positions; False (nothing taken) when its group
        lacks them."""
        have = len(req.pages)
        if num_tokens <= have * self.page_size:
            return True
        pages = self.alloc.allocate(req.group, pages_for(num_tokens, self.page_size) - have)
        if pages is None:
            return False
        req.pages.extend(pages)
        if req.page_table is not None:
            req.page_table[have:have + len(pages)] = pages
        return True

    def _preempt(self, req: Request) -> None:
        self.running[req.group].remove(req)
        self._release(req)
        req.drop_pending()  # its calls in flight are dropped (stale epoch); the tokens are sampled again
        req.num_computed = 0
        req.in_flight = False  # its work still in a pipeline is dropped when it leaves (stale epoch)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.requeue(req)

    def _release(self, req: Request) -> None:
        self.alloc.free(req.group, req.pages)
        req.pages, req.cache_entries = [], []
        req.group = req.microbatch = -1
        if req.page_table is not None:
            req.page_table[:] = 0
