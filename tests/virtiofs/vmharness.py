"""Boot the embedded guest under QEMU with a virtio-fs backend, without the daemon.

Used by the integration tests and bench/fs_bench.py. The guest's init
mounts a virtio-fs device tagged ``spectrum`` at /mnt/spectrum; scripts
are sent on its control port (``run BASE64``, guest/README.md) and print
``MARK ...`` lines on the serial console, which :meth:`Vm.run_script`
collects. Every process started here is ended by pid in :meth:`Vm.close`.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import itertools
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
QEMU = "qemu-system-x86_64"
MEM_MIB = 256


def unused_ids(n: int, start: int = 2046885000) -> list[int]:
    """*n* ids that are no user's, no group's, and no running process's uid or gid."""
    used: set[int] = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith(("Uid:", "Gid:")):
                    used.update(int(x) for x in line.split()[1:])
    found = []
    for i in itertools.count(start):
        if i in used:
            continue
        try:
            pwd.getpwuid(i)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(i)
            continue
        except KeyError:
            pass
        found.append(i)
        if len(found) == n:
            return found
    raise AssertionError("unreachable")


def connect(path: str, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def spawn_ours(
    vhost_fd: int,
    exports: list[tuple[str, int, bool]],
    control_fd: int | None = None,
    *,
    listening: bool = False,
    confine: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m spectrumd.virtiofs`` on *vhost_fd* with directory-fd exports.

    With *listening*, *vhost_fd* and *control_fd* are listening sockets
    (``--vhost-listen-fd``, ``--control-listen-fd``), as the daemon passes
    them; with *confine* the backend runs ``--confine UID:GID``.
    """
    kind = "listen-fd" if listening else "fd"
    argv = [sys.executable, "-m", "spectrumd.virtiofs", f"--vhost-{kind}", str(vhost_fd)]
    argv += os.environ.get("SPECTRUMD_VIRTIOFS_ARGS", "").split()  # tuning runs of fs_bench
    if os.environ.get("SPECTRUMD_VIRTIOFS_CPROFILE"):  # a profile of the backend, for tuning
        argv[1:1] = ["-m", "cProfile", "-o", os.environ["SPECTRUMD_VIRTIOFS_CPROFILE"]]
    fds = [vhost_fd]
    for name, fd, rw in exports:
        argv += ["--export", f"{name}={fd}:{'rw' if rw else 'ro'}"]
        fds.append(fd)
    if control_fd is not None:
        argv += [f"--control-{kind}", str(control_fd)]
        fds.append(control_fd)
    if confine is not None:
        argv += ["--confine", f"{confine[0]}:{confine[1]}"]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
    )


def listen(path: Path) -> socket.socket:
    """A unix stream socket listening on *path*, as the daemon makes one for a VMM."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


class Vm:
    """One q35 guest; ``fs_args`` adds the file-system devices to QEMU's argv."""

    def __init__(self, guest: Path, run: Path, fs_args: list[str], *, initrd: Path | None = None,
                 pass_fds: tuple[int, ...] = (), append: str = "",
                 prealloc: bool = False) -> None:  # fmt: skip
        self.run = run
        self.console = bytearray()
        self.argv = [
            QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-smp", "1",
            "-m", f"{MEM_MIB}M",
            "-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"
            + (",prealloc=on" if prealloc else ""),
            "-kernel", str(guest / "vmlinuz"),
            "-initrd", str(initrd or guest / "initramfs.img"),
            "-append", "console=ttyS0 panic=-1 quiet" + append,
            "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
            "-chardev", f"socket,id=console,path={run}/console.sock,server=on,wait=off",
            "-serial", "chardev:console",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=control,path={run}/control.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=control,name=org.spectrum_os.control",
            *fs_args,
        ]  # fmt: skip
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.socks: list[socket.socket] = []
        self.ctl_buf = bytearray()

    def start(self) -> None:
        with open(self.run / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, pass_fds=self.pass_fds,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        qmp = connect(f"{self.run}/qmp.sock", deadline)
        con = connect(f"{self.run}/console.sock", deadline)
        self.ctl = connect(f"{self.run}/control.sock", deadline)
        self.socks = [qmp, con, self.ctl]
        threading.Thread(target=self._pump, args=(con, self.console), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.ctl, self.ctl_buf), daemon=True).start()
        f = qmp.makefile("rwb", buffering=0)
        f.readline()
        for cmd in (b'{"execute":"qmp_capabilities"}\n', b'{"execute":"cont"}\n'):
            f.write(cmd)
            f.readline()

    @staticmethod
    def _pump(sock: socket.socket, into: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                into += data

    def text(self) -> str:
        return self.console.decode(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while b"ready\n" not in self.ctl_buf:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise RuntimeError(f"guest not ready:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def run_script(self, script: str, end: str, timeout: float = 120) -> str:
        """Run *script* as the guest's app; wait for the console line *end*; returns the console.

        The app runs once per boot (guest/README.md): a script that must
        run in steps reads further steps from files the host writes.
        """
        self.wait_ready()
        self.ctl.sendall(b"run " + base64.b64encode(script.encode()) + b"\n")
        return self.wait_for(end, timeout)

    def wait_for(self, marker: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while marker.encode() not in self.console:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {marker!r} on the console:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        return self.text()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        for s in self.socks:
            s.close()


def virtiofs_args(
    fd: int | None = None, tag: str = "spectrum", *, path: Path | None = None, name: str = "fs"
) -> list[str]:
    """QEMU's vhost-user-fs device on the connected socket *fd*, or connecting
    to *path*; *name* is its chardev's id (one per device)."""
    where = f"fd={fd}" if path is None else f"path={path}"
    return [
        "-chardev", f"socket,id={name},{where}",
        "-device", f"vhost-user-fs-pci,queue-size=1024,chardev={name},tag={tag}",
    ]  # fmt: skip
