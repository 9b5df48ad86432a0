"""The host page allocator: free list, ref counts, prefix cache, LRU eviction, invariants."""

import random
from types import SimpleNamespace

import pytest

from jaxinfer.kv_cache import PageAllocator

L = 4  # page size


def make_seq(tokens):
    return SimpleNamespace(token_ids=list(tokens), block_table=[], page_hashes=[])


def prefill(alloc, seq):
    """Admits `seq`, computes all its tokens and registers its full pages; returns cached tokens."""
    cached = alloc.allocate_prompt(seq)
    alloc.reserve(seq, len(seq.token_ids))
    alloc.register_full_pages(seq, len(seq.token_ids))
    return cached


def test_allocate_and_free():
    alloc = PageAllocator(8, L)
    seq = make_seq(range(10))
    assert prefill(alloc, seq) == 0
    assert len(seq.block_table) == 3 and alloc.num_free_pages == 5
    assert [alloc.ref_count(p) for p in seq.block_table] == [1, 1, 1]
    alloc.check_invariants([seq])
    alloc.free(seq)
    assert seq.block_table == [] and seq.page_hashes == []
    assert alloc.num_free_pages == 8
    assert all(alloc.ref_count(p) == 0 for p in range(8))
    alloc.check_invariants([])


def test_reserve_grows_a_page_at_a_time():
    alloc = PageAllocator(8, L)
    seq = make_seq(range(4))
    alloc.reserve(seq, 4)
    assert len(seq.block_table) == 1
    assert alloc.pages_needed(seq, 4) == 0 and alloc.pages_needed(seq, 5) == 1
    alloc.reserve(seq, 5)
    alloc.reserve(seq, 8)
    assert len(seq.block_table) == 2 and alloc.num_free_pages == 6


def test_reserve_past_the_pool_raises_and_changes_nothing():
    alloc = PageAllocator(2, L)
    seq = make_seq(range(9))
    assert not alloc.can_reserve(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV pages"):
        alloc.reserve(seq, 9)
    assert seq.block_table == [] and alloc.num_free_pages == 2


def test_prefix_hit_shares_pages_and_reports_cached_tokens():
    alloc = PageAllocator(16, L)
    a = make_seq(range(10))
    prefill(alloc, a)
    b = make_seq([*range(8), 50, 51, 52])
    assert alloc.allocate_prompt(b) == 8
    assert b.block_table == a.block_table[:2] and b.page_hashes == a.page_hashes
    assert [alloc.ref_count(p) for p in b.block_table] == [2, 2]
    alloc.reserve(b, 11)
    assert b.block_table[2] != a.block_table[2]
    c = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 1])  # first page matches, second does not
    assert alloc.allocate_prompt(c) == 4 and c.block_table == a.block_table[:1]
    alloc.check_invariants([a, b, c])


def test_same_page_content_after_another_prefix_is_a_miss():
    alloc = PageAllocator(16, L)
    prefill(alloc, make_seq([0, 1, 2, 3, 4, 5, 6, 7, 8]))
    # the second page's tokens match, but its prefix does not: keys chain over all tokens
    assert alloc.allocate_prompt(make_seq([9, 9, 9, 9, 4, 5, 6, 7, 8])) == 0


def test_last_prompt_token_is_never_a_hit():
    alloc = PageAllocator(16, L)
    prefill(alloc, make_seq(range(8)))
    assert alloc.allocate_prompt(make_seq(range(8))) == 4  # two full pages cached, one reused
    assert alloc.allocate_prompt(make_seq(range(9))) == 8
    assert alloc.allocate_prompt(make_seq(range(1))) == 0


def test_freed_full_pages_stay_cached_and_are_reused():
    alloc = PageAllocator(8, L)
    a = make_seq(range(9))
    prefill(alloc, a)
    pages = list(a.block_table)
    alloc.free(a)
    assert alloc.num_free_pages == 8 and alloc.num_cached_pages == 2
    b = make_seq(range(9))
    assert alloc.allocate_prompt(b) == 8 and b.block_table == pages[:2]
    assert alloc.num_free_pages == 6
    alloc.check_invariants([b])


def test_lru_eviction_only_when_free_pages_run_out():
    alloc = PageAllocator(4, L)
    a, b = make_seq(range(5)), make_seq(range(100, 105))
    prefill(alloc, a)  # pages [0, 1]; page 0 full and cached
    prefill(alloc, b)  # pages [2, 3]; page 2 full and cached
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free_pages == 4 and alloc.is_cached(0) and alloc.is_cached(2)
    again = make_seq(range(5))  # touch page 0: page 2 becomes least recently used
    assert alloc.allocate_prompt(again) == 4
    alloc.free(again)
    c = make_seq(range(200, 206))  # two pages: the clean ones, no eviction
    prefill(alloc, c)
    assert sorted(c.block_table) == [1, 3] and alloc.is_cached(0) and alloc.is_cached(2)
    d = make_seq(range(300, 302))  # one page: evicts page 2, the least recently used
    prefill(alloc, d)
    assert d.block_table == [2] and not alloc.is_cached(2) and alloc.is_cached(0)
    assert alloc.allocate_prompt(make_seq(range(100, 105))) == 0  # its key is gone
    assert alloc.allocate_prompt(make_seq(range(5))) == 4
    assert alloc.num_cached_pages == 2  # page 0, and c's full first page


def test_concurrent_duplicate_pages_stay_apart_and_free_cleanly():
    alloc = PageAllocator(8, L)
    a, b = make_seq(range(9)), make_seq(range(9))
    for seq in (a, b):  # both admitted before either registers its pages
        assert alloc.allocate_prompt(seq) == 0
        alloc.reserve(seq, 9)
    alloc.register_full_pages(a, 9)
    alloc.register_full_pages(b, 9)
    assert b.page_hashes == a.page_hashes and not alloc.is_cached(b.block_table[0])
    c = make_seq([*range(8), 7, 7])
    assert alloc.allocate_prompt(c) == 8 and c.block_table == a.block_table[:2]
    alloc.check_invariants([a, b, c])
    for seq in (a, b, c):
        alloc.free(seq)
    assert alloc.num_free_pages == 8 and alloc.num_cached_pages == 2
    alloc.check_invariants([])


def test_prefix_caching_off():
    alloc = PageAllocator(8, L, enable_prefix_caching=False)
    a = make_seq(range(9))
    prefill(alloc, a)
    alloc.free(a)
    assert alloc.num_cached_pages == 0 and alloc.allocate_prompt(make_seq(range(9))) == 0


class _Device:
    """Fake page contents: what each slot holds, to check that cache hits hold the right tokens."""

    def __init__(self, alloc):
        self.alloc, self.slots = alloc, {}

    def compute(self, seq, start, end):
        for pos in range(start, end):
            page = seq.block_table[pos // L]
            assert self.alloc.ref_count(page) == 1 and not self.alloc.is_cached(page)
            self.slots[page * L + pos % L] = seq.token_ids[pos]
        self.alloc.register_full_pages(seq, end)

    def check_hit(self, seq, cached):
        held = [self.slots[seq.block_table[p // L] * L + p % L] for p in range(cached)]
        assert held == seq.token_ids[:cached]


def _stress_op(rng, alloc, device, live):
    """One random operation: admit a prompt, decode a token, or free (finish or abort)."""
    op = rng.random()
    if op < 0.4 or not live:
        prefix = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], []])  # shared prefixes
        seq = make_seq(prefix + [rng.randrange(4) for _ in range(rng.randrange(1, 10))])
        cached = alloc.allocate_prompt(seq)
        assert cached % L == 0 and cached < len(seq.token_ids)
        device.check_hit(seq, cached)
        if alloc.can_reserve(seq, len(seq.token_ids)):
            alloc.reserve(seq, len(seq.token_ids))
            device.compute(seq, cached, len(seq.token_ids))
            live.append(seq)
        else:
            alloc.free(seq)
    elif op < 0.8:
        seq = rng.choice(live)
        seq.token_ids.append(rng.randrange(4))
        if alloc.can_reserve(seq, len(seq.token_ids)):
            alloc.reserve(seq, len(seq.token_ids))
            device.compute(seq, len(seq.token_ids) - 1, len(seq.token_ids))
        else:  # out of pages: preempt it
            alloc.free(seq)
            live.remove(seq)
    else:
        seq = live.pop(rng.randrange(len(live)))
        alloc.free(seq)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("caching", [True, False])
def test_random_operations_keep_invariants(seed, caching):
    rng = random.Random(seed)
    alloc = PageAllocator(12, L, enable_prefix_caching=caching)
    device, live = _Device(alloc), []
    for _ in range(600):
        _stress_op(rng, alloc, device, live)
        alloc.check_invariants(live)
        in_use = {p for seq in live for p in seq.block_table}
        assert alloc.num_free_pages + len(in_use) == alloc.num_pages
    for seq in live:
        alloc.free(seq)
    alloc.check_invariants([])
    assert alloc.num_free_pages == alloc.num_pages
    assert all(alloc.ref_count(p) == 0 for p in range(alloc.num_pages))
