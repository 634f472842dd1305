"""The caching-allocator simulator against hand-computed cases from torch's rules (CUDACachingAllocator.cpp)
and the PyTorch devlog "When does fragmentation occur in the CUDA caching allocator?" (ezyang, 2026-06-01)."""
from __future__ import annotations

import pytest

from kubetune.estimator.allocator import CachingAllocator, OutOfMemory, allocation_size, round_size, simulate

MiB = 1 << 20


def seq(*groups):
    """("a", n, mib) allocates n tensors of mib MiB; ("f",) frees everything alive."""
    ev, live, i = [], [], 0
    for g in groups:
        if g[0] == "a":
            for _ in range(g[1]):
                ev.append(("a", i, int(g[2] * MiB)))
                live.append(i)
                i += 1
        else:
            ev.extend(("f", j) for j in live)
            live = []
    return ev


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(1 * MiB) == 2 * MiB  # small pool: 2 MiB segments
    assert allocation_size(1 * MiB + 512) == 20 * MiB  # 1-10 MiB: 20 MiB segments
    assert allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB  # above: rounded up to 2 MiB
    assert allocation_size(11 * MiB) == 12 * MiB


def test_documented_order_example_without_expandable_segments():
    # 8x16 MiB, free, 4x32 MiB: eight 16 MiB segments cannot merge, four new 32 MiB segments -> 256 MiB
    r = simulate(seq(("a", 8, 16), ("f",), ("a", 4, 32)))
    assert r.peak_reserved == 256 * MiB and r.peak_allocated == 128 * MiB
    # the reverse order splits the 32 MiB segments: 128 MiB
    r = simulate(seq(("a", 4, 32), ("f",), ("a", 8, 16)))
    assert r.peak_reserved == 128 * MiB


def test_documented_example_with_expandable_segments():
    # 8x16 MiB in 20 MiB pages: 7 pages (140 MiB); freed they merge, and 4x32 MiB maps nothing new
    r = simulate(seq(("a", 8, 16)), expandable_segments=True)
    assert r.peak_reserved == 140 * MiB
    r = simulate(seq(("a", 8, 16), ("f",), ("a", 4, 32)), expandable_segments=True)
    assert r.peak_reserved == 140 * MiB
    # pinned splits: keep #1 and #3 of four 16 MiB, a 32 MiB request must grow the segment
    ev = seq(("a", 4, 16)) + [("f", 0), ("f", 2), ("a", 9, 32 * MiB)]
    r = simulate(ev, expandable_segments=True)
    assert r.peak_reserved == 100 * MiB  # 80 MiB for the four, then 16 free at the end + 20 more


def test_small_pool_packs_2mib_segments():
    r = simulate([("a", i, 1000) for i in range(2048)])  # 1000 B -> 1024 B, 2048 per 2 MiB
    assert r.peak_reserved == 2 * MiB and r.peak_allocated == 2 * MiB
    r = simulate([("a", i, 1000) for i in range(2049)])
    assert r.peak_reserved == 4 * MiB


def test_mid_sized_requests_share_20mib_segments():
    r = simulate([("a", i, 3 * MiB) for i in range(6)])  # 18 MiB in one 20 MiB segment
    assert r.peak_reserved == 20 * MiB
    r = simulate([("a", i, 3 * MiB) for i in range(7)])  # the 2 MiB remainder cannot hold the 7th
    assert r.peak_reserved == 40 * MiB


def test_large_pool_splits_only_remainders_over_1mib():
    a = CachingAllocator()
    b = a.malloc(12 * MiB)
    a.free(b)
    b = a.malloc(11 * MiB + 512 * 1024)  # remainder 0.5 MiB: not split, the whole 12 MiB block is handed out
    assert b.size == 12 * MiB and a.allocated == 12 * MiB
    a.free(b)
    b = a.malloc(10 * MiB)  # remainder 2 MiB: split
    assert b.size == 10 * MiB and a.reserved == 12 * MiB


def test_free_blocks_merge_only_within_a_segment():
    a = CachingAllocator()
    x, y = a.malloc(4 * MiB), a.malloc(4 * MiB)  # one 20 MiB segment
    a.free(x)
    a.free(y)
    z = a.malloc(20 * MiB)  # x, y and the remainder merged back into the 20 MiB segment
    assert a.reserved == 20 * MiB and z.size == 20 * MiB


def test_best_fit_prefers_the_smallest_block():
    a = CachingAllocator()
    big, small = a.malloc(64 * MiB), a.malloc(32 * MiB)
    a.free(big)
    a.free(small)
    t = a.malloc(30 * MiB)
    assert t.ptr == small.ptr  # 32 MiB block, not the 64 MiB one


def test_max_split_size():
    ms = 100 * MiB
    # an oversize cached block never serves a small request
    r = simulate([("a", 0, 200 * MiB), ("f", 0), ("a", 1, 50 * MiB)], max_split_size=ms)
    assert r.peak_reserved == 250 * MiB
    # ...and serves a large one only within 20 MiB of its size, unsplit
    r = simulate([("a", 0, 200 * MiB), ("f", 0), ("a", 1, 190 * MiB)], max_split_size=ms)
    assert r.peak_reserved == 200 * MiB and r.peak_allocated == 200 * MiB
    r = simulate([("a", 0, 200 * MiB), ("f", 0), ("a", 1, 150 * MiB)], max_split_size=ms)
    assert r.peak_reserved == 350 * MiB


def test_streams_do_not_share_blocks():
    r = simulate([("a", 0, 16 * MiB, 0), ("f", 0), ("a", 1, 16 * MiB, 1)])
    assert r.peak_reserved == 32 * MiB


def test_capacity_releases_cached_segments_then_ooms():
    ev = seq(("a", 8, 16), ("f",), ("a", 4, 32))
    r = simulate(ev, capacity=200 * MiB)  # the stale 16 MiB segments are cudaFreed: it fits
    assert r.peak_reserved <= 200 * MiB and r.reserved == 128 * MiB
    with pytest.raises(OutOfMemory):
        simulate(seq(("a", 8, 16), ("a", 4, 32)), capacity=200 * MiB)


def test_reset_peaks():
    ev = seq(("a", 8, 16), ("f",), ("a", 4, 32))
    r = simulate(ev, reset_peaks_at=16)  # after the frees: 128 MiB cached, 4x32 adds 128
    assert r.peak_reserved == 256 * MiB and r.peak_allocated == 128 * MiB
