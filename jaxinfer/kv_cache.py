"""Paged KV cache: the host page allocator (plain Python, no JAX) and the device page pools.

The device keeps K/V in a pool of `P` pages of `L` token slots each; a sequence's block table
lists its pages in order, so token position `p` lives in slot `block_table[p // L] * L + p % L`.
`PageAllocator` decides which pages each sequence gets:

- a free list of clean pages and a reference count per page (one per block table holding it);
- prefix caching: once a page is full, its content is keyed by (key of the previous page, its
  `L` tokens) — a chain over all tokens up to and including the page. A later prompt that
  starts with the same tokens takes those pages instead of recomputing them (shared, refcount
  above one). Keys are exact dict keys and chain ids are never reused, so two different
  prefixes can never meet under one key.
- a page whose refcount drops to zero keeps its cached content (evictable) until free pages run
  out; then the least recently freed one is evicted and its key dropped.

Sequences passed in are any objects with `token_ids` (prompt + output so far), `block_table`
(list of page ids) and `page_hashes` (chain ids of its full pages, kept by this allocator).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from typing import Protocol

_ROOT = 0  # parent chain id of a sequence's first page; real chain ids start at 1


class PagedSequence(Protocol):
    """What the allocator reads and writes on a sequence."""

    token_ids: list[int]
    block_table: list[int]
    page_hashes: list[int]


class PageAllocator:
    """Hands out KV pages to sequences: free list, ref counts, LRU prefix cache.

    Args:
      num_pages: P, pages in the device pool.
      page_size: L, token slots per page.
      enable_prefix_caching: keep full pages keyed by their prefix and reuse them.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._free = collections.deque(range(num_pages))  # refcount 0, no cached content
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._page_key: list[tuple | None] = [None] * num_pages
        self._cache: dict[tuple, tuple[int, int]] = {}  # (parent id, tokens) -> (chain id, page)
        self._ids = itertools.count(_ROOT + 1)

    # ---- queries ----

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can take now: clean free pages plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages holding cached content, in use or evictable."""
        return len(self._cache)

    def ref_count(self, page: int) -> int:
        """Number of block tables holding `page`."""
        return self._ref[page]

    def is_cached(self, page: int) -> bool:
        """Whether `page` holds registered full-page content (a prefix-cache entry)."""
        return self._page_key[page] is not None

    def pages_needed(self, seq: PagedSequence, num_tokens: int) -> int:
        """New pages `seq` needs so its block table holds `num_tokens` token slots."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.block_table))

    def can_reserve(self, seq: PagedSequence, num_tokens: int) -> bool:
        """Whether `reserve(seq, num_tokens)` would succeed."""
        return self.pages_needed(seq, num_tokens) <= self.num_free_pages

    # ---- sequence operations ----

    def allocate_prompt(self, seq: PagedSequence) -> int:
        """Gives a sequence with no pages the cached pages of its longest cached prefix.

        Only full pages are reused, and never the one holding the last token: at least one
        token must be computed to produce logits.

        Returns:
          The number of leading tokens whose K/V are already in the pages (a multiple of L).
        """
        if seq.block_table:
            raise ValueError("allocate_prompt needs a sequence without pages")
        for chain_id, page in self._match_prefix(seq.token_ids):
            self._take_cached(page)
            seq.block_table.append(page)
            seq.page_hashes.append(chain_id)
        return len(seq.block_table) * self.page_size

    def reserve(self, seq: PagedSequence, num_tokens: int) -> None:
        """Grows `seq`'s block table with fresh pages until it holds `num_tokens` slots.

        Raises:
          RuntimeError: not enough free pages (check `can_reserve` first).
        """
        needed = self.pages_needed(seq, num_tokens)
        if needed > self.num_free_pages:
            raise RuntimeError(f"out of KV pages: need {needed}, {self.num_free_pages} free")
        seq.block_table.extend(self._take_free() for _ in range(needed))

    def register_full_pages(self, seq: PagedSequence, num_computed_tokens: int) -> None:
        """Records the prefix keys of `seq`'s pages made full by its first computed tokens.

        Call after the K/V of `seq.token_ids[:num_computed_tokens]` are written. A page whose
        content is already cached elsewhere (computed twice concurrently) stays uncached.
        """
        if not self.enable_prefix_caching:
            return
        size = self.page_size
        for i in range(len(seq.page_hashes), num_computed_tokens // size):
            parent = seq.page_hashes[-1] if seq.page_hashes else _ROOT
            key = (parent, tuple(seq.token_ids[i * size : (i + 1) * size]))
            entry = self._cache.get(key)
            chain_id = entry[0] if entry else self._register(seq.block_table[i], key)
            seq.page_hashes.append(chain_id)

    def free(self, seq: PagedSequence) -> None:
        """Drops `seq`'s hold on its pages; pages nobody holds become free or evictable."""
        for page in reversed(seq.block_table):  # tail pages first: they are evicted first
            self._ref[page] -= 1
            if self._ref[page] > 0:
                continue
            if self._page_key[page] is None:
                self._free.append(page)
            else:
                self._evictable[page] = None
        seq.block_table.clear()
        seq.page_hashes.clear()

    def forget_cache(self) -> None:
        """Drops every prefix-cache entry (the pages' contents are gone); held pages stay held."""
        for page in self._evictable:
            self._free.append(page)
        self._evictable.clear()
        self._cache.clear()
        self._page_key = [None] * self.num_pages

    # ---- internals ----

    def _match_prefix(self, token_ids: list[int]) -> list[tuple[int, int]]:
        """(chain id, page) of each cached full page the tokens start with, last token excluded."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, size = [], _ROOT, self.page_size
        for i in range((len(token_ids) - 1) // size):
            entry = self._cache.get((parent, tuple(token_ids[i * size : (i + 1) * size])))
            if entry is None:
                break
            hits.append(entry)
            parent = entry[0]
        return hits

    def _take_cached(self, page: int) -> None:
        if self._ref[page] == 0:
            del self._evictable[page]
        self._ref[page] += 1

    def _take_free(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:  # out of clean pages: evict the least recently freed cached page
            page, _ = self._evictable.popitem(last=False)
            del self._cache[self._page_key[page]]
            self._page_key[page] = None
        self._ref[page] = 1
        return page

    def _register(self, page: int, key: tuple) -> int:
        assert self._page_key[page] is None and self._ref[page] == 1, page
        chain_id = next(self._ids)
        self._cache[key] = (chain_id, page)
        self._page_key[page] = key
        return chain_id

    # ---- checks ----

    def check_invariants(self, seqs: Iterable[PagedSequence]) -> None:
        """Asserts the bookkeeping agrees with the block tables of `seqs` (all live sequences).

        Refcounts equal the number of block tables holding each page; every page is exactly one
        of in use, free or evictable; a page shared by two sequences sits at the same index in
        both and both hold identical tokens up to its end; cache entries point at their pages.
        """
        seqs = list(seqs)
        holders = collections.defaultdict(list)
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "page twice in one table"
            for i, page in enumerate(seq.block_table):
                holders[page].append((seq, i))
        free = set(self._free)
        assert len(free) == len(self._free), "page twice in the free list"
        for page in range(self.num_pages):
            self._check_page(page, holders.get(page, []), page in free)
        for key, (_, page) in self._cache.items():
            assert self._page_key[page] == key, f"cache entry for page {page} is stale"

    def _check_page(self, page: int, holders: list, is_free: bool) -> None:
        ref, cached = self._ref[page], self._page_key[page] is not None
        assert ref == len(holders), f"page {page}: refcount {ref}, held by {len(holders)}"
        states = (ref > 0, is_free, page in self._evictable)
        assert sum(states) == 1, f"page {page} is in {states} (in use, free, evictable)"
        assert not (is_free and cached), f"free page {page} still has a cache key"
        assert cached or page not in self._evictable, f"evictable page {page} has no cache key"
        if len(holders) > 1:
            (first, i), end = holders[0], (holders[0][1] + 1) * self.page_size
            for seq, j in holders[1:]:
                assert j == i and seq.token_ids[:end] == first.token_ids[:end], (
                    f"page {page} shared by sequences with different prefixes"
                )


# ---------------------------------------------------------------------------------------------
# The device side: one page pool pytree, donated through every step.


def page_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype) -> int:
    """Bytes of one page over all layers, K and V."""
    import numpy as np

    return 2 * num_layers * num_kv_heads * page_size * head_dim * np.dtype(dtype).itemsize


def init_pages(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_pages: int,
    page_size: int,
    dtype,
    sharding,
    abstract: bool = False,
) -> tuple:
    """Zeroed page pools: per layer (k, v), each [K, P, L, H]; on `sharding` (a mesh splits K,
    see `sharding.kv_sharding`). `abstract`: their shapes only (`jax.ShapeDtypeStruct`), to
    compile programs over before the memory is taken."""
    import jax
    import jax.numpy as jnp

    shape = (num_kv_heads, num_pages, page_size, head_dim)
    if abstract:
        zeros = lambda: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
    else:
        zeros = lambda: jnp.zeros(shape, dtype, device=sharding)
    return tuple((zeros(), zeros()) for _ in range(num_layers))
