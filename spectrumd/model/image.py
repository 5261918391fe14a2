"""What an application's root image is: its file system, read from the superblock.

The embedded guest mounts a root image read-only as erofs or ext4 (see the
README, "The image contract"); anything else would fail inside the guest,
after a boot, with only a console line to show for it. This module reads the
superblock's magic on the host, so that a wrong file is an error that names
it, at configuration and again at start.
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path

import attrs

# virtio-pmem maps the image in whole 2 MiB pages (QEMU refuses other sizes,
# crosvm pads); the guest's DAX mount needs the file system's block size to be
# the page size.
PMEM_ALIGN = 2 * 1024 * 1024
DAX_BLOCK_SIZE = 4096

# Superblock magics (little-endian): erofs at 1024 (EROFS_SUPER_OFFSET), ext2/3/4
# at 1024 + 0x38. The block size: erofs's blkszbits (u8 at 1024 + 12); ext4's
# s_log_block_size (le32 at 1024 + 24, block size = 1024 << it).
EROFS_MAGIC = 0xE0F5E1E2
EXT4_MAGIC = 0xEF53
_EROFS_MAGIC_AT = 1024
_EXT4_MAGIC_AT = 1080
_HEADER = 2048


class ImageFs(enum.StrEnum):
    erofs = "erofs"
    ext4 = "ext4"


class ImageError(Exception):
    """A root image that cannot be used; ``missing`` when the file is not there."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@attrs.frozen
class ImageInfo:
    fstype: ImageFs
    size: int
    block_size: int


def _le(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at : at + size], "little")


def parse_superblock(header: bytes) -> tuple[ImageFs, int] | None:
    """(file system, block size) from an image's first 2 KiB; None if neither magic is there."""
    if len(header) < _HEADER:
        return None
    if _le(header, _EROFS_MAGIC_AT, 4) == EROFS_MAGIC:
        bits = header[_EROFS_MAGIC_AT + 12]
        return ImageFs.erofs, (1 << bits) if 9 <= bits <= 16 else 0
    if _le(header, _EXT4_MAGIC_AT, 2) == EXT4_MAGIC:
        log = _le(header, 1024 + 24, 4)
        return ImageFs.ext4, (1024 << log) if log <= 6 else 0
    return None


def probe_image(path: Path, *, share: bool, what: str = "root image") -> ImageInfo:
    """Read ``path``'s superblock; check what sharing it (virtio-pmem, DAX) needs.

    Raises ImageError: not found (``missing``), not a regular file, too small,
    no erofs or ext4 superblock, or (``share``) a size that is not a multiple
    of 2 MiB or a block size DAX cannot map.
    """
    # Look before opening: opening some device nodes acts (a watchdog starts,
    # a tape rewinds). O_NONBLOCK: a FIFO swapped in meanwhile must not hang.
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError(f"{what} {path} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ImageError(f"{what} {path} not found", missing=True) from None
    except OSError as e:
        raise ImageError(f"{what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{what} {path} is not a regular file")
        header = os.pread(fd, _HEADER, 0)
    except OSError as e:
        raise ImageError(f"{what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    found = parse_superblock(header)
    if found is None:
        raise ImageError(
            f"{what} {path} is not an erofs or ext4 image (no superblock magic at "
            "byte 1024 or 1080): corrupt, or an unknown file system"
        )
    fstype, block_size = found
    if share and st.st_size % PMEM_ALIGN:
        raise ImageError(
            f"{what} {path} is {st.st_size} bytes; a shared image (share_root) must be "
            "a multiple of 2 MiB: pad it (truncate -s %2M FILE)"
        )
    if share and block_size != DAX_BLOCK_SIZE:
        raise ImageError(
            f"{what} {path} has {block_size}-byte blocks; a shared image (share_root) "
            f"is mounted with DAX, which needs {DAX_BLOCK_SIZE}-byte blocks"
        )
    return ImageInfo(fstype=fstype, size=st.st_size, block_size=block_size)
