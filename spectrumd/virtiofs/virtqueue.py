"""Split virtqueues read from guest memory (virtio 1.x, section 2.7).

The guest owns the descriptor table and the available ring and may change
them at any moment, so every field is read once (``unpack_from`` copies it)
and checked before use: a head or next index beyond the table, a chain
longer than the table (a loop), an indirect table that is empty, nested,
misaligned or combined with NEXT, a readable descriptor after a writable
one, or an address outside guest memory makes the chain fail with
:class:`ChainError`. The device then returns that chain with length 0 and
carries on. An available index that runs more than a ring ahead of ours
means the guest is broken: the queue stops (``broken``) until reset.

Adjacent descriptors that are contiguous in one memory region are merged,
so a 1 MiB O_DIRECT request of 256 pages becomes a few iovecs.
"""

from __future__ import annotations

import contextlib
import os
import struct

from .memory import GuestMemory, MemoryError_

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE = 32768
# Parsed indirect tables kept per queue: at most this many, of at most this
# many bytes in all (so at most 16,384 views: a few MiB, whatever the guest
# sends). A 1 MiB request's table is about 4 KiB.
MAX_TABLES = 256
MAX_TABLE_BYTES = 256 << 10
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
# A parsed indirect table: its bytes, and the chain's parts (see Chain).
_Parsed = tuple[bytes, list[memoryview], list[memoryview], int, int]


class ChainError(Exception):
    """A descriptor chain the guest built is unusable; the message says how."""


class Chain:
    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len  # bytes in *readable*, all told
        self.writable_len = writable_len


class Virtqueue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addrs: tuple[int, int, int] | None = None  # desc, used, avail (VMM addresses)
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.enabled = False
        self.started = False
        self.broken = False
        self.last_avail = 0
        self.used_idx = 0
        self.desc: memoryview | None = None
        self.avail: memoryview | None = None
        self.used: memoryview | None = None
        # Indirect tables already parsed, by their address and length: their
        # bytes and the chain's parts (see _walk).
        self.tables: dict[tuple[int, int], _Parsed] = {}
        self.table_bytes = 0
        self.table_hits = self.table_misses = 0  # for tuning (logged at DEBUG)

    # -- setup (from vhost-user messages) --

    def map(self, mem: GuestMemory) -> None:
        """Find the rings in *mem* (after SET_VRING_ADDR or SET_MEM_TABLE); raises MemoryError_."""
        self.desc = self.avail = self.used = None
        self.tables = {}  # views of the old memory table
        self.table_bytes = 0
        if self.addrs is None or not self.num:
            return
        d, u, a = self.addrs
        self.desc = mem.view(d, 16 * self.num, uva=True)
        self.avail = mem.view(a, 6 + 2 * self.num, uva=True)
        self.used = mem.view(u, 6 + 8 * self.num, uva=True)

    def ready(self) -> bool:
        return self.started and self.enabled and not self.broken and self.desc is not None

    def reset(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        stats = self.table_hits, self.table_misses
        self.__init__(self.index)  # type: ignore[misc]
        self.table_hits, self.table_misses = stats

    # -- the data path --

    def pop(self, mem: GuestMemory) -> Chain | ChainError | None:
        """The next available chain, a ChainError for a bad one (to return), or None."""
        avail = self.avail
        assert avail is not None and self.desc is not None
        idx = _U16.unpack_from(avail, 2)[0]
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            self.broken = True
            return None
        head = _U16.unpack_from(avail, 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            return ChainError(f"head {head} beyond the ring of {self.num}")
        try:
            return self._walk(mem, head)
        except (ChainError, MemoryError_) as e:
            err = e if isinstance(e, ChainError) else ChainError(str(e))
            err.head = head  # type: ignore[attr-defined]
            return err

    def _walk(self, mem: GuestMemory, head: int) -> Chain:
        assert self.desc is not None
        table: memoryview = self.desc
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, copied
        size = budget = self.num
        indirect = seen_write = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        # The segment being merged: its region view, start, end, direction.
        cur: memoryview | None = None
        cur_start = cur_end = 0
        cur_w = False
        # The region the last descriptor was in (most are in the same one).
        r_view: memoryview | None = None
        r_gpa = r_size = 0
        i = head
        while True:
            if budget <= 0:
                raise ChainError("descriptor chain loops or is longer than its table")
            budget -= 1
            if entries is None:
                addr, length, flags, nxt = DESC.unpack_from(table, 16 * i)
            else:
                addr, length, flags, nxt = entries[i]
            if flags & F_INDIRECT:
                if indirect or flags & F_NEXT:
                    raise ChainError("nested indirect table, or indirect with NEXT")
                if length == 0 or length % 16 or length > 16 * MAX_QUEUE:
                    raise ChainError(f"indirect table of {length} bytes")
                # One copy of the whole table: the guest cannot change it under us.
                raw = bytes(mem.view(addr, length))
                if i == head and not readable and not writable and cur is None:
                    # A guest reuses its buffers (dd's 1 MiB, the kernel's
                    # request structs), so the same table comes again and
                    # again. Its views depend on nothing but these bytes
                    # and the memory table, which clears the cache (map).
                    # Found by address, and used only if the bytes are the
                    # same (a compare costs less than hashing them).
                    known = self.tables.get((addr, length))
                    if known is not None and known[0] == raw:
                        self.table_hits += 1
                        return Chain(head, known[1], known[2], known[3], known[4])
                    self.table_misses += 1
                    fast = _sequential_table(mem, head, raw)
                    if fast is not None:
                        old = self.tables.pop((addr, length), None)
                        if old is not None:
                            self.table_bytes -= len(old[0])
                        if (
                            len(self.tables) >= MAX_TABLES
                            or self.table_bytes + length > MAX_TABLE_BYTES
                        ):
                            self.tables.clear()
                            self.table_bytes = 0
                        if length <= MAX_TABLE_BYTES:
                            parsed = (
                                raw,
                                fast.readable,
                                fast.writable,
                                fast.readable_len,
                                fast.writable_len,
                            )
                            self.tables[addr, length] = parsed
                            self.table_bytes += length
                        return fast
                entries = list(DESC.iter_unpack(raw))
                size = budget = length // 16
                indirect = True
                i = 0
                continue
            w = bool(flags & F_WRITE)
            if not w and seen_write:
                raise ChainError("readable descriptor after a writable one")
            seen_write = w
            if length:
                off = addr - r_gpa
                if r_view is None or off < 0 or off + length > r_size:
                    k, off = mem.locate(addr, length)
                    reg = mem.regions[k]
                    r_view, r_gpa, r_size = reg.view, reg.gpa, reg.size
                if w and r_view.readonly:
                    raise ChainError(f"a buffer to write at {addr:#x} is in read-only memory")
                if cur is r_view and cur_w == w and cur_end == off:
                    cur_end += length
                else:
                    if cur is not None:
                        (writable if cur_w else readable).append(cur[cur_start:cur_end])
                    cur, cur_start, cur_end, cur_w = r_view, off, off + length, w
            if not flags & F_NEXT:
                break
            if nxt >= size:
                raise ChainError(f"next {nxt} beyond a table of {size}")
            i = nxt
        if cur is not None:
            (writable if cur_w else readable).append(cur[cur_start:cur_end])
        return Chain(head, readable, writable, sum(map(len, readable)), sum(map(len, writable)))

    def push(self, head: int, length: int) -> None:
        """Return chain *head* with *length* bytes written; signal with :meth:`notify`."""
        used = self.used
        assert used is not None
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.num), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the index.
        _U16.pack_into(used, 2, self.used_idx)

    def notify(self) -> None:
        avail = self.avail
        if self.call_fd < 0 or avail is None:
            return
        if _U16.unpack_from(avail, 0)[0] & AVAIL_F_NO_INTERRUPT:
            return
        # BlockingIOError: the counter is saturated, a notification is pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.call_fd, 1)

    def start_used(self) -> None:
        """Take the used index from the ring (after SET_VRING_BASE and ADDR)."""
        if self.used is not None:
            self.used_idx = _U16.unpack_from(self.used, 2)[0]


def _sequential_table(mem: GuestMemory, head: int, raw: bytes) -> Chain | None:
    """The chain of an indirect table as Linux lays it out, in one plain pass.

    Linux's driver fills an indirect table in order (entry i's next is i + 1),
    readable entries first, all in one memory region. For such a table the
    views are built in a single loop with none of the general walk's state
    (most requests are a 4-entry table; a 1 MiB one has 258). Anything else
    returns None and takes the general walk, which says what is wrong.
    """
    n = len(raw) >> 4
    first = DESC.unpack_from(raw, 0)[0]
    for r in mem.regions:
        if 0 <= first - r.gpa < r.size:
            break
    else:
        return None
    g, size, v = r.gpa, r.size, r.view
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    out = readable
    seen_w = False
    readable_len = writable_len = 0
    # The run being merged, [cs, ce) in the region; cs < 0: none yet.
    cs = ce = -1
    i = 0
    for addr, length, flags, nxt in DESC.iter_unpack(raw):
        i += 1
        if i < n:
            if nxt != i or flags & ~F_WRITE != F_NEXT:
                return None
        elif flags & (F_NEXT | F_INDIRECT):
            return None
        off = addr - g
        if off < 0 or off + length > size:
            return None  # outside the region, or in another one
        if flags & F_WRITE:
            if not seen_w:
                if cs >= 0:
                    out.append(v[cs:ce])
                    cs = -1
                seen_w = True
                out = writable
            writable_len += length
        elif seen_w:
            return None  # a readable entry after a writable one
        else:
            readable_len += length
        if not length:
            continue
        # Runs contiguous in guest memory merge (a guest's pages mostly are:
        # 1 MiB is typically some 26 runs, not 256 pages).
        if off == ce and cs >= 0:
            ce += length
        else:
            if cs >= 0:
                out.append(v[cs:ce])
            cs, ce = off, off + length
    if cs >= 0:
        out.append(v[cs:ce])
    if seen_w and v.readonly:
        return None  # buffers to write in read-only memory: the general walk refuses them
    return Chain(head, readable, writable, readable_len, writable_len)
