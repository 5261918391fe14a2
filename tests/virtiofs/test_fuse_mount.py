"""The backend's process serving a real host FUSE mount through /dev/fuse (no VM).

The test mounts (the one step that takes a path) and hands the /dev/fuse
fd to ``python -m spectrumd.virtiofs --fuse-fd N``, the same ops layer the
vhost-user path uses. Needs root and /dev/fuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.virtiofs.control import send_command
from spectrumd.virtiofs.fusedev import mount, umount
from spectrumd.virtiofs.ops import DEFAULT_ATTR_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+fuse"),
]


class Mounted:
    """Exports rw and ro (and a symlink out of rw) served by the backend on a FUSE mount.

    *control* ``fd`` passes a connected socket (``self.ctl``); ``listen``
    passes a listening one, which :meth:`connect` reaches. With *confine*
    the backend runs ``--confine UID:GID``. Its stderr goes to ``self.log``.
    """

    def __init__(self, base: Path, confine: tuple[int, int] | None = None,
                 control: str = "fd") -> None:  # fmt: skip
        self.base = base
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        for d in ("rw", "ro", "outside"):
            (base / d).mkdir()
        (base / "ro" / "file").write_text("read only\n")
        (base / "outside" / "secret").write_text("secret\n")
        os.symlink(base / "outside", base / "rw" / "escape")
        self.fuse_fd = mount(self.mnt)
        rw = os.open(base / "rw", os.O_PATH | os.O_DIRECTORY)
        ro = os.open(base / "ro", os.O_PATH | os.O_DIRECTORY)
        theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if control == "listen":
            theirs.bind("")  # an abstract name of the kernel's choosing
            theirs.listen()
            self.address = theirs.getsockname()
            option = "--control-listen-fd"
        else:
            theirs.close()
            self.ctl, theirs = socket.socketpair()
            self.ctl.settimeout(10)
            option = "--control-fd"
        argv = [sys.executable, "-m", "spectrumd.virtiofs", "--fuse-fd", str(self.fuse_fd),
                "--export", f"rw={rw}:rw", "--export", f"ro={ro}:ro",
                option, str(theirs.fileno())]  # fmt: skip
        if confine:
            argv += ["--confine", f"{confine[0]}:{confine[1]}"]
        self.log = base / "backend.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, pass_fds=(self.fuse_fd, rw, ro, theirs.fileno()),
                env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=log,
            )  # fmt: skip
        for fd in (rw, ro):
            os.close(fd)
        theirs.close()

    def connect(self) -> socket.socket:
        """A new control connection (``control="listen"``)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.address)
        return s

    def close(self) -> None:
        try:
            umount(self.mnt)
        finally:
            os.close(self.fuse_fd)
            try:
                self.proc.wait(10)  # the server ends when its file system is unmounted
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if hasattr(self, "ctl"):
                self.ctl.close()


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Mounted]:
    m = Mounted(tmp_path)
    try:
        yield m
    finally:
        m.close()


def sh(cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def test_ls_mv_rm_mkdir_through_the_mount(fs: Mounted) -> None:
    m, base = fs.mnt, fs.base
    assert sorted(os.listdir(m)) == ["ro", "rw"]
    r = sh(f"cd {m}/rw && mkdir -p a/b && echo hi > a/b/f && mv a/b/f a/g && ls a && "
           f"cat a/g && rm a/g && rmdir a/b && ls -la . && mv a c && rmdir c")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("b\ng\nhi\n")
    assert sorted(os.listdir(base / "rw")) == ["escape"]
    assert (m / "ro" / "file").read_text() == "read only\n"
    r = sh(f"echo x > {m}/ro/new")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not (base / "ro" / "new").exists()


def test_fio_verify(fs: Mounted, tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (scripts/install-deps.sh)")
    r = sh(
        f"fio --name=v --directory={fs.mnt}/rw --size=32M --bs=64k --rw=randwrite "
        "--verify=crc32c --do_verify=1 --ioengine=psync --numjobs=2 --runtime=60 --time_based=0 "
        "--output-format=terse",
        timeout=110,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" not in r.stderr.lower(), r.stderr


def test_live_export_changes_through_the_control_fd(fs: Mounted) -> None:
    m, base = fs.mnt, fs.base
    (base / "late").mkdir()
    (base / "late" / "f").write_text("late\n")
    fd = os.open(base / "late", os.O_PATH | os.O_DIRECTORY)
    try:
        reply = send_command(fs.ctl, {"op": "add_export", "name": "late", "writable": False}, (fd,))
    finally:
        os.close(fd)
    assert reply == {"ok": True}
    assert sorted(os.listdir(m)) == ["late", "ro", "rw"]
    f = os.open(m / "late" / "f", os.O_RDONLY)
    try:
        assert os.pread(f, 100, 0) == b"late\n"
        os.fstat(f)  # its attributes are now held by the kernel
        reply = send_command(fs.ctl, {"op": "remove_export", "name": "late"})
        assert reply == {"ok": True, "settle": DEFAULT_ATTR_TIMEOUT}
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            os.pread(f, 100, 0)
        assert e.value.errno == errno.EIO and time.monotonic() - t < 2  # at once
        # Only the attributes held may still be shown, and only until the
        # settle time the reply named: then they are refused too.
        time.sleep(max(0.0, reply["settle"] - (time.monotonic() - t)))
        with pytest.raises(OSError) as e:
            os.fstat(f)
        assert e.value.errno == errno.EIO
    finally:
        with contextlib.suppress(OSError):  # its FLUSH is refused too (EIO); the fd is closed
            os.close(f)
    assert sorted(os.listdir(m)) == ["ro", "rw"]
    assert not (m / "late").exists()


def test_a_confined_server_acts_as_its_uid(tmp_path: Path) -> None:
    m = Mounted(tmp_path, confine=(65534, 65534))
    try:
        (tmp_path / "rw").chmod(0o755)  # root's: nobody may not write here
        os.mkdir(tmp_path / "rw" / "open", 0o777)
        os.chmod(tmp_path / "rw" / "open", 0o777)
        (m.mnt / "rw" / "open" / "f").write_text("x")
        assert (tmp_path / "rw" / "open" / "f").stat().st_uid == 65534
        with pytest.raises(PermissionError):
            (m.mnt / "rw" / "g").write_text("x")  # the host said no to uid 65534
        assert not (tmp_path / "rw" / "g").exists()
    finally:
        m.close()
    assert m.proc.returncode == 0, m.log.read_text()
