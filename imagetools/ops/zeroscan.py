"""Finding zero sectors in big buffers without a per-byte loop.

qemu-img decides what to write and what to leave sparse sector by sector
(512 bytes). Doing that with a Python loop over 2 MiB buffers would be far
too slow, so these helpers lean on C-speed bytes operations: ``find`` of a
512-byte zero pattern locates the next zero sector candidate, and
``startswith`` against a slice of a shared zero buffer tests a whole range
at memcmp speed without copying. Runs are measured by galloping, so the
cost is proportional to the bytes looked at, not to the number of sectors.
"""

from __future__ import annotations

SECTOR = 512
_ZEROS = bytes(32 * 1024 * 1024)
_ZVIEW = memoryview(_ZEROS)
_ZERO_SECTOR = bytes(SECTOR)
_ZERO_WORD = bytes(8)

Buffer = bytes | bytearray


def zero_view(length: int) -> memoryview:
    """A read-only view of ``length`` zero bytes (no allocation)."""
    if length <= len(_ZEROS):
        return _ZVIEW[:length]
    return memoryview(bytes(length))


def range_is_zero(buf: Buffer, start: int, end: int) -> bool:
    """True if ``buf[start:end]`` is all zero bytes."""
    pos = start
    while pos < end:
        step = min(end - pos, len(_ZEROS))
        if not buf.startswith(_ZVIEW[:step], pos):
            return False
        pos += step
    return True


def is_zero(buf: Buffer) -> bool:
    return range_is_zero(buf, 0, len(buf))


def zero_run(buf: Buffer, first: int, limit: int) -> int:
    """Number of zero sectors from sector ``first`` on (at most ``limit``)."""
    base = first * SECTOR
    if limit <= 0 or not buf.startswith(_ZERO_SECTOR, base):
        return 0
    good, probe = 1, 2
    while probe <= limit and range_is_zero(buf, base + good * SECTOR, base + probe * SECTOR):
        good, probe = probe, probe * 2
    bad = min(probe, limit + 1)
    while bad - good > 1:          # invariant: good sectors zero, bad not all zero
        mid = (good + bad) // 2
        if range_is_zero(buf, base + good * SECTOR, base + mid * SECTOR):
            good = mid
        else:
            bad = mid
    return good


def data_run(buf: Buffer, first: int, limit: int) -> int:
    """Number of sectors from ``first`` on before the next zero sector (<= ``limit``).

    A zero sector starts with eight zero bytes, so the first word of every
    sector is gathered (a strided copy, 8 bytes per sector) and searched;
    only sectors whose first word is zero are then checked whole. Data with
    few zero words (random, compressed, text) costs a few microseconds per
    megabyte instead of a scan of every byte.
    """
    if limit <= 0:
        return 0
    base = first * SECTOR
    view = memoryview(buf)[base:base + limit * SECTOR]
    if len(view) < limit * SECTOR:
        return _data_run_slow(buf, first, limit)
    heads = view.cast("B").cast("Q")[::SECTOR // 8].tobytes()
    search = 0
    while True:
        hit = heads.find(_ZERO_WORD, search)
        if hit < 0:
            return limit
        if hit % 8:
            search = hit - hit % 8 + 8
            continue
        sector = hit // 8
        if buf.startswith(_ZERO_SECTOR, base + sector * SECTOR):
            return sector
        search = hit + 8


def sector_heads(buf: Buffer, sectors: int) -> bytes:
    """The first eight bytes of each of the first ``sectors`` sectors of
    ``buf``, concatenated (for :func:`no_zero_sector`)."""
    return memoryview(buf)[:sectors * SECTOR].cast("B").cast("Q")[::SECTOR // 8].tobytes()


def no_zero_sector(heads: bytes, first: int, n: int) -> bool:
    """True if none of sectors ``first`` .. ``first+n-1`` (of the buffer that
    ``heads`` was taken from) can be all zeros: none starts with a zero word.
    A fast answer for the common case of a chunk that is all data; False
    says only that a closer look is needed."""
    end = (first + n) * 8
    hit = heads.find(_ZERO_WORD, first * 8, end)
    while hit >= 0:
        if not hit % 8:
            return False
        hit = heads.find(_ZERO_WORD, hit - hit % 8 + 8, end)
    return True


def _data_run_slow(buf: Buffer, first: int, limit: int) -> int:
    base = first * SECTOR
    end = min(len(buf), base + limit * SECTOR)
    search = base
    while True:
        hit = buf.find(_ZERO_SECTOR, search, end)
        if hit < 0:
            return limit
        sector = -(-(hit - base) // SECTOR)          # first aligned start >= hit
        if sector >= limit:
            return limit
        if buf.startswith(_ZERO_SECTOR, base + sector * SECTOR):
            return sector
        search = base + sector * SECTOR + 1


def same_state_run(buf: Buffer, first: int, limit: int) -> tuple[bool, int]:
    """(is_zero, count): the run of sectors sharing sector ``first``'s state."""
    zeros = zero_run(buf, first, limit)
    if zeros:
        return True, zeros
    return False, max(1, data_run(buf, first + 1, limit - 1) + 1) if limit > 1 else 1


def is_allocated_sectors(buf: Buffer, first: int, n: int, sector_num: int,
                         alignment: int) -> tuple[bool, int]:
    """qemu-img's is_allocated_sectors: (has data, sectors in that state).

    ``first`` is the sector index inside ``buf``; ``sector_num`` the guest
    sector it stands for (for aligning the end of runs to ``alignment``).
    """
    if n <= 0:
        return False, 0
    zero, i = same_state_run(buf, first, n)
    if i == n:
        return not zero, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if zero and i <= tail:
            zero = False
        if not zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not zero, i


def is_allocated_sectors_min(buf: Buffer, first: int, n: int, minimum: int,
                             sector_num: int, alignment: int) -> tuple[bool, int]:
    """qemu-img's is_allocated_sectors_min: ignore zero gaps shorter than ``minimum``."""
    if n < minimum:
        minimum = n
    allocated, pnum = is_allocated_sectors(buf, first, n, sector_num, alignment)
    if not allocated:
        return False, pnum
    used = checked = pnum
    first += pnum
    n -= pnum
    sector_num += pnum
    while n > 0:
        allocated, pnum = is_allocated_sectors(buf, first, n, sector_num, alignment)
        first += pnum
        n -= pnum
        sector_num += pnum
        checked += pnum
        if allocated:
            used = checked
        elif pnum >= minimum:
            break
    return True, used


def first_nonzero_sector(buf: Buffer, start: int = 0, end: int | None = None) -> int:
    """Byte offset (sector aligned, relative to ``start``) of the first sector
    holding a non-zero byte in ``buf[start:end]``, or -1 if all are zero."""
    end = len(buf) if end is None else end
    sectors = -(-(end - start) // SECTOR)
    pos = 0
    while pos < sectors:
        a = start + pos * SECTOR
        b = min(end, a + SECTOR)
        if not range_is_zero(buf, a, b):
            return pos * SECTOR
        run = zero_run(buf, start // SECTOR + pos, sectors - pos) if start % SECTOR == 0 else 1
        pos += max(run, 1)
    return -1
