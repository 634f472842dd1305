"""A simulator of PyTorch's CUDA caching allocator: replays a trace of allocations and frees and returns
what the allocator reserves from the device (what must fit on the GPU besides the CUDA context).

Pure Python, no torch. It follows ``c10/cuda/CUDACachingAllocator.cpp`` (torch 2.x) rule for rule:

- sizes are rounded up to 512 B (``round_size``; roundup_power2_divisions is not modelled: off by default);
- requests of at most 1 MiB come from the small pool, larger ones from the large pool; pools and streams
  never share blocks;
- best fit: the smallest cached free block of the stream that holds the request (ties: lowest address);
  a block of at least ``max_split_size`` serves only requests of at least max_split_size, and only if it is
  less than 20 MiB larger than the request;
- without expandable segments a miss ``cudaMalloc``\\s a new segment: 2 MiB for small requests, 20 MiB
  for 1-10 MiB requests, the request rounded up to 2 MiB above that (``get_allocation_size``);
- the found block is split when the remainder is worth keeping: always (>= 512 B) in the small pool and
  under expandable segments; in the large pool only when the remainder is over 1 MiB and the request
  is under max_split_size (``should_split``);
- a freed block merges with its free neighbours; neighbours exist only inside one segment, so free blocks
  of different cudaMalloc segments never merge (the source of fragmentation);
- ``expandable_segments:True`` (kubetune's trainer sets it): one segment per (pool, stream) that grows by
  mapping pages at its end, 2 MiB for the small pool and 20 MiB for the large one; a miss maps just
  enough pages after the last free block of the segment and merges them with it; in the best fit that
  tail block counts as large as it could grow (``get_free_block``'s expandable_size);
- with a ``capacity``, a cudaMalloc that does not fit first frees every cached unsplit segment
  (``release_cached_blocks``), then raises :class:`OutOfMemory`, as torch does before its OOM error.

Reserved bytes are segment bytes (cudaMalloc'd or mapped): torch.cuda.memory_reserved(). Allocated bytes
are the sizes of allocated blocks (after rounding): torch.cuda.memory_allocated().
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Iterable

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20
NO_SPLIT_LIMIT = 1 << 62  # max_split_size unset

# the two settings the estimate names (status.estimate.allocatorSetting)
DEFAULT = "expandable_segments:False"
EXPANDABLE = "expandable_segments:True"


class OutOfMemory(Exception):
    pass


def round_size(size: int) -> int:
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return K_MIN_BLOCK * ((size + K_MIN_BLOCK - 1) // K_MIN_BLOCK)


def allocation_size(size: int) -> int:
    """What a miss cudaMallocs for a rounded request (no expandable segments)."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


class _Block:
    __slots__ = ("ptr", "size", "stream", "small", "allocated", "mapped", "prev", "next", "expandable", "k")

    def __init__(self, ptr: int, size: int, stream: int, small: bool, expandable: bool = False, mapped: bool = True):
        self.ptr, self.size, self.stream, self.small = ptr, size, stream, small
        self.allocated = False
        self.mapped = mapped
        self.expandable = expandable
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.k = 0

    def key(self) -> tuple[int, int, int]:
        return (self.stream, self.size, self.ptr)


# A free block's sort key is one int, (stream, size, address) packed: one int compares much faster than a
# tuple, and the pools' bisects are most of a replay's time. Addresses and sizes stay below 2**60.
_SZ = 60
_ST = 120


class _Pool:
    """Free mapped blocks ordered as torch's BlockComparatorSize: (stream, size, address)."""

    __slots__ = ("keys", "blocks")

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.blocks: dict[int, _Block] = {}

    def add(self, b: _Block) -> None:
        k = b.k = (b.stream << _ST) | (b.size << _SZ) | b.ptr
        insort(self.keys, k)
        self.blocks[k] = b

    def remove(self, b: _Block) -> None:
        k = b.k
        del self.keys[bisect_left(self.keys, k)]
        del self.blocks[k]


@dataclass
class SimResult:
    peak_reserved: int
    peak_allocated: int
    reserved: int  # at the end of the trace
    allocated: int
    segments: int  # cudaMallocs (or page mappings) made
    ooms: int = 0


class CachingAllocator:
    """The allocator's state; ``malloc`` returns a handle for ``free``."""

    def __init__(
        self, *, expandable_segments: bool = False, max_split_size: int | None = None, capacity: int | None = None
    ) -> None:
        self.expandable = expandable_segments
        self.max_split = max_split_size or NO_SPLIT_LIMIT
        self.capacity = capacity
        self.pools = {True: _Pool(), False: _Pool()}  # small?
        self.tails: dict[tuple[bool, int], _Block] = {}  # expandable: the unmapped tail per (pool, stream)
        self._next_ptr = 1 << 40
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.segments = 0

    # ---- torch's get_free_block
    def _get_free_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        keys = pool.keys
        i = bisect_left(keys, (stream << _ST) | (size << _SZ))
        if i == len(keys) or keys[i] >> _ST != stream:
            return None
        b = pool.blocks[keys[i]]
        if b.expandable and self.expandable:
            # best fit by the size a block could grow to: the tail block of a segment counts with the
            # unmapped space behind it, so a plainly bigger block is preferred to growing the segment
            def grow(x: _Block) -> int:
                return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)

            j = i + 1
            while j < len(keys) and keys[j] >> _ST == stream and b.expandable:
                n = pool.blocks[keys[j]]
                if grow(n) < grow(b):
                    b, i = n, j
                    j += 1
                else:
                    break
        if size < self.max_split and b.size >= self.max_split:
            return None
        if size >= self.max_split and b.size >= size + K_LARGE_BUFFER:
            return None
        pool.remove(b)
        return b

    # ---- new memory
    def _reserve(self, n: int) -> None:
        if self.capacity is not None and self.reserved + n > self.capacity:
            self._release_cached()
            if self.reserved + n > self.capacity:
                raise OutOfMemory(f"reserved {self.reserved} + {n} > capacity {self.capacity}")
        self.reserved += n
        self.segments += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _release_cached(self) -> None:
        """release_cached_blocks: cudaFree every free block that is a whole segment (not expandable)."""
        for pool in self.pools.values():
            for k in list(pool.keys):
                b = pool.blocks[k]
                if not b.expandable and b.prev is None and b.next is None:
                    pool.remove(b)
                    self.reserved -= b.size

    def _alloc_segment(self, size: int, small: bool, stream: int) -> _Block:
        n = allocation_size(size)
        self._reserve(n)
        b = _Block(self._next_ptr, n, stream, small)
        self._next_ptr += n + (1 << 30)  # segments are never adjacent
        return b

    def _alloc_expandable(self, size: int, small: bool, stream: int) -> _Block:
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        tail = self.tails.get((small, stream))
        if tail is None:
            tail = _Block(self._next_ptr, 1 << 50, stream, small, expandable=True, mapped=False)
            self._next_ptr += (1 << 50) + (1 << 30)
            self.tails[(small, stream)] = tail
        pool = self.pools[small]
        cand = tail.prev if (tail.prev is not None and not tail.prev.allocated) else None
        have = cand.size if cand is not None else 0
        need = size - have
        mapped = page * ((need + page - 1) // page)
        self._reserve(mapped)
        # the pages are cut from the front of the unmapped tail and merged with the free block before it
        if cand is not None:
            pool.remove(cand)
            cand.size += mapped
            blk = cand
        else:
            blk = _Block(tail.ptr, mapped, stream, small, expandable=True)
            blk.prev, blk.next = tail.prev, tail
            if tail.prev is not None:
                tail.prev.next = blk
            tail.prev = blk
        tail.ptr += mapped
        tail.size -= mapped
        return blk

    # ---- torch's malloc / free
    def malloc(self, nbytes: int, stream: int = 0) -> _Block:
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        pool = self.pools[small]
        b = self._get_free_block(pool, size, stream)
        if b is None:
            if self.expandable:
                b = self._alloc_expandable(size, small, stream)
            else:
                b = self._alloc_segment(size, small, stream)
        rem = b.size - size
        if small or self.expandable:
            split = rem >= K_MIN_BLOCK
        else:
            split = size < self.max_split and rem > K_SMALL_SIZE
        if split:
            r = _Block(b.ptr + size, rem, stream, small, expandable=b.expandable)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            b.next = r
            b.size = size
            pool.add(r)
        b.allocated = True
        self.allocated += b.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return b

    def free(self, b: _Block) -> None:
        assert b.allocated, "double free"
        b.allocated = False
        self.allocated -= b.size
        pool = self.pools[b.small]
        p = b.prev
        if p is not None and not p.allocated and p.mapped:  # [p b] -> b
            pool.remove(p)
            b.ptr, b.size, b.prev = p.ptr, b.size + p.size, p.prev
            if b.prev is not None:
                b.prev.next = b
        n = b.next
        if n is not None and not n.allocated and n.mapped:  # [b n] -> b
            pool.remove(n)
            b.size += n.size
            b.next = n.next
            if b.next is not None:
                b.next.prev = b
        pool.add(b)

    def result(self, ooms: int = 0) -> SimResult:
        return SimResult(self.peak_reserved, self.peak_allocated, self.reserved, self.allocated, self.segments, ooms)


def simulate(
    events: Iterable[tuple],
    *,
    expandable_segments: bool = False,
    max_split_size: int | None = None,
    capacity: int | None = None,
    reset_peaks_at: int | None = None,
) -> SimResult:
    """Replay ``events`` and return the peaks.

    An event is ``("a", id, nbytes)`` or ``("a", id, nbytes, stream)`` (allocate) or ``("f", id)`` (free).
    ``reset_peaks_at``: index of the event at which the peaks restart (torch.cuda.reset_peak_memory_stats:
    e.g. to read the second of two replayed steps alone). With ``capacity``, an allocation that cannot be
    served raises :class:`OutOfMemory`.
    """
    a = CachingAllocator(expandable_segments=expandable_segments, max_split_size=max_split_size, capacity=capacity)
    live: dict = {}
    for i, ev in enumerate(events):
        if i == reset_peaks_at:
            a.peak_reserved, a.peak_allocated = a.reserved, a.allocated
        if ev[0] == "a":
            live[ev[1]] = a.malloc(ev[2], ev[3] if len(ev) > 3 else 0)
        else:
            a.free(live.pop(ev[1]))
    return a.result()
