"""Paged KV cache: the host-side page allocator (page-table rows live on each request, kept by
`moejax.engine.scheduler`).

The device pools are one `(k, v)` pair, each [L_pad, P_total, page_size, K, H] (see
`moejax.steps`): layers split over `stage`, kv heads over `tensor`, pages over the data groups (`data`,
times `expert` in the "dp_attention" expert mode). Data group g owns the global pages
[g * P_group, (g + 1) * P_group) and addresses them by LOCAL ids 0..P_group-1; a request lives in one
data group and only ever holds that group's pages.

Invariant (from `moejax.model.attention`): token at position p of a sequence lives in page
`table[p // page_size]` at slot `p % page_size`. Pages beyond a sequence's length may hold stale
data from earlier owners, NaN included; attention zeroes every slot past a row's last position before
any arithmetic, so reuse needs no zeroing.
"""

from __future__ import annotations

from moejax.config import ceil_div


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` positions."""
    return ceil_div(num_tokens, page_size)


class PageAllocator:
    """Free lists of local page ids, one per data group. Pure host state, O(pages) per call.

    Args:
      num_groups: data groups, the model's batch shards (`data`, times `expert` in the dp_attention expert mode).
      pages_per_group: pages in each group's pool.
    """

    def __init__(self, num_groups: int, pages_per_group: int):
        if num_groups < 1 or pages_per_group < 1:
            raise ValueError(f"need at least one group and one page, got {num_groups} groups x {pages_per_group} pages")
        self.num_groups = num_groups
        self.pages_per_group = pages_per_group
        # Stack of free ids; popping from the end hands out low ids first.
        self._free = [list(range(pages_per_group - 1, -1, -1)) for _ in range(num_groups)]

    def num_free(self, group: int) -> int:
        return len(self._free[group])

    @property
    def total_free(self) -> int:
        return sum(len(f) for f in self._free)

    def allocate(self, group: int, n: int) -> list[int] | None:
        """n local page ids of `group`, or None (nothing taken) when fewer are free."""
        free = self._free[group]
        if n > len(free):
            return None
        if n == 0:
            return []
        taken = free[-n:]
        del free[-n:]
        return taken[::-1]

    def free(self, group: int, pages: list[int]) -> None:
        """Return pages to `group`'s pool (most recently freed are reused first)."""
        free = self._free[group]
        if len(free) + len(pages) > self.pages_per_group:
            raise RuntimeError(f"double free in data group {group}: {len(pages)} pages back, {len(free)} already free")
        free.extend(reversed(pages))

