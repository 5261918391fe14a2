"""The one way the daemon writes a file it will read back: atomically, by descriptor.

A record (a run's state, its USB attachments, the grants, the run-time
instances) is written to a new temporary file in the same directory and
renamed over the old one, so a reader sees the old file or the new one,
never half of either, and a crash leaves at most a stray temporary file.

Nothing here follows a symlink: the directory is opened with O_NOFOLLOW (or
given as a descriptor), the temporary file is created with
O_CREAT|O_EXCL|O_NOFOLLOW under a random name (a file or link planted in
advance under any name is never opened), and rename(2) replaces a link named
like the target instead of writing through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomically(
    path: Path | str, data: str | bytes, *, dir_fd: int | None = None, mode: int = 0o600
) -> None:
    """Replace ``path`` with ``data``, or leave it as it was.

    With ``dir_fd``, ``path`` is a single file name in that directory;
    without, the file's directory is opened (a symlink as its last component
    is refused). Raises OSError (a full disk, a missing directory; the
    temporary file is removed) and ValueError for a bad name.
    """
    path = Path(path)
    name = path.name
    if dir_fd is not None and str(path) != name:
        raise ValueError(f"with a directory descriptor, give a file name, not {str(path)!r}")
    if not name or name in (".", "..") or "\0" in name:
        raise ValueError(f"not a file name: {name!r}")
    body = data.encode() if isinstance(data, str) else data
    dfd = os.open(path.parent, _DIR_FLAGS) if dir_fd is None else dir_fd
    try:
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, _TMP_FLAGS, mode, dir_fd=dfd)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        # The rename itself is durable once the directory is.
        os.fsync(dfd)
    finally:
        if dir_fd is None:
            os.close(dfd)
