"""Guest memory as the VMM shares it: regions mmapped from the fds of SET_MEM_TABLE.

Every address the guest gives us (descriptor addresses are guest-physical;
ring addresses from the VMM are its own virtual addresses) is translated
here and only here, and checked to lie wholly inside one region: what
comes back is a memoryview of exactly that range, so an access outside
guest memory cannot happen. A range that spans two adjacent regions is
split into one view per region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass


class MemoryError_(Exception):
    """An address or length the guest gave lies outside its memory."""


@dataclass(eq=False)
class Region:
    gpa: int
    size: int
    uva: int
    map: mmap.mmap | None
    view: memoryview


class GuestMemory:
    """The current memory table; empty until the first SET_MEM_TABLE."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    @staticmethod
    def mapped(regions: list[tuple[int, int, int, int, int]]) -> GuestMemory:
        """Map ``(gpa, size, uva, mmap_offset, fd)`` regions; fds stay the caller's.

        Raises OSError or ValueError (e.g. a region larger than its file).
        """
        mem = GuestMemory()
        try:
            for gpa, size, uva, offset, fd in regions:
                if size <= 0 or gpa + size > 1 << 64 or uva + size > 1 << 64:
                    raise ValueError(f"bad region size {size:#x}")
                if offset < 0 or offset + size > os.fstat(fd).st_size:
                    raise ValueError(f"region {gpa:#x}+{size:#x} is beyond its file")
                # mmap offsets must be page-aligned: map from 0 and slice. A
                # region the VMM has read-only (a shared root image on
                # virtio-pmem) comes as a read-only fd: mapped read-only, its
                # views refuse writes, and no reply may go there (virtqueue).
                try:
                    m = mmap.mmap(
                        fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                    )
                except PermissionError:
                    m = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ)
                mem.regions.append(Region(gpa, size, uva, m, memoryview(m)[offset : offset + size]))
        except BaseException:
            mem.close()
            raise
        return mem

    @staticmethod
    def from_buffer(gpa: int, buf: memoryview, uva: int | None = None) -> GuestMemory:
        """One region over *buf* (tests: a memfd mapping)."""
        mem = GuestMemory()
        mem.regions.append(Region(gpa, len(buf), gpa if uva is None else uva, None, buf))
        return mem

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            if r.map is not None:
                # A view still alive somewhere: unmapped when it is collected.
                with contextlib.suppress(BufferError):
                    r.map.close()
        self.regions = []

    def _find(self, addr: int, uva: bool) -> Region:
        for r in self.regions:
            base = r.uva if uva else r.gpa
            if base <= addr < base + r.size:
                return r
        raise MemoryError_(f"address {addr:#x} is outside guest memory")

    def views(self, addr: int, length: int, *, uva: bool = False) -> list[memoryview]:
        """Views of ``[addr, addr + length)``; raises MemoryError_."""
        out = []
        while length > 0:
            r = self._find(addr, uva)
            start = addr - (r.uva if uva else r.gpa)
            n = min(length, r.size - start)
            out.append(r.view[start : start + n])
            addr += n
            length -= n
        return out

    def view(self, addr: int, length: int, *, uva: bool = False) -> memoryview:
        """One contiguous view (ring structures must not span regions)."""
        r = self._find(addr, uva)
        start = addr - (r.uva if uva else r.gpa)
        if length < 0 or start + length > r.size:
            raise MemoryError_(f"range {addr:#x}+{length:#x} is outside one region")
        return r.view[start : start + length]

    def locate(self, gpa: int, length: int) -> tuple[int, int]:
        """``(region index, offset)`` of a range inside one region, or raises MemoryError_."""
        for i, r in enumerate(self.regions):
            start = gpa - r.gpa
            if 0 <= start < r.size:
                if length > r.size - start:
                    raise MemoryError_(f"range {gpa:#x}+{length:#x} crosses a region end")
                return i, start
        raise MemoryError_(f"address {gpa:#x} is outside guest memory")
