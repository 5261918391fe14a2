"""File-server benchmark: ``.venv/bin/python bench/fs_bench.py [--guest-dir DIR]``.

One guest (the embedded default guest, TCG, 1 vCPU) is booted per server,
each on the same kernel and initramfs, over the same files on the host:

* ``spectrumd``: our server (``python -m spectrumd.fileserver``, as the
  daemon runs it: its own process, user ``nobody`` when run as root) on the
  VMM's ``org.spectrum_os.fs`` port, mounted by the guest's init through its
  busybox relay (msize 512 KiB);
* ``diod``: Debian's C 9P server on the same port and relay (it always
  negotiates msize 64 KiB);
* ``virtfs``: QEMU's built-in ``-virtfs local`` (virtio-9p, a different
  transport with no relay): the ceiling of 9P in this guest. Its kernel
  module (``9pnet_virtio``) is not in the embedded guest; it is fetched once
  from the guest's kernel package and appended to the initramfs.

In the guest, with ``cache=none``: sequential read of a 64 MiB host file
(``dd bs=1M``), sequential write of 64 MiB (``dd bs=1M`` + ``sync``), and
``ls -lR`` of a tree of 2,000 files (20 directories of 100). Times come from
the guest's ``/proc/uptime`` (10 ms resolution). Target: ours within 1.5x of
diod on each figure. Prints a table; exits 1 only if the benchmark could not
run. Everything started here is ended by pid on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import lzma
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spectrumd.fileserver.client import FileServerClient  # noqa: E402

QEMU = "qemu-system-x86_64"
MIB = 1 << 20
BIG_MIB = 64
N_DIRS, N_FILES = 20, 100
TARGET = 1.5
CACHE = Path("/var/cache/spectrumd/bench")
SERVER_USER = "nobody" if os.geteuid() == 0 else None

# Run in the guest with $D the directory holding the files. Each figure is one
# "BENCH name start end [count]" line on the console.
GUEST_SCRIPT = r"""
t() { cut -d' ' -f1 /proc/uptime; }
cd /
a=$(t); dd if=$D/big of=/dev/null bs=1M 2>/dev/null || echo "BENCH-ERR read"; b=$(t)
echo "BENCH read $a $b"
a=$(t); dd if=/dev/zero of=$D/out bs=1M count=64 2>/dev/null || echo "BENCH-ERR write"
sync; b=$(t)
echo "BENCH write $a $b"
a=$(t); n=$(ls -lR $D/tree | grep -c '^-'); b=$(t)
echo "BENCH stat $a $b $n"
"""


def make_files(base: Path) -> Path:
    export = base / "export"
    export.mkdir(mode=0o777)
    export.chmod(0o777)  # the guest writes "out" here as the server's user
    with open(export / "big", "wb") as f:
        chunk = os.urandom(MIB)
        for _ in range(BIG_MIB):
            f.write(chunk)
    (export / "big").chmod(0o644)
    tree = export / "tree"
    tree.mkdir(mode=0o755)
    for d in range(N_DIRS):
        sub = tree / f"d{d:02}"
        sub.mkdir(mode=0o755)
        for i in range(N_FILES):
            (sub / f"f{i:03}").write_bytes(b"x" * i)
    return export


def virtfs_initrd(guest: Path, work: Path) -> Path:
    """The guest's initramfs plus 9pnet_virtio.ko (a second, appended cpio)."""
    kver = (guest / "kernel-version").read_text().split()
    pkg, ver = kver[0], kver[1]
    CACHE.mkdir(parents=True, exist_ok=True)
    ko = CACHE / f"9pnet_virtio-{ver}.ko"
    if not ko.exists():
        dl = Path(tempfile.mkdtemp(prefix="fsb-dl.", dir="/tmp"))
        try:
            subprocess.run(["apt-get", "download", pkg], cwd=dl, check=True)
            deb = next(dl.glob("*.deb"))
            subprocess.run(
                f"dpkg-deb --fsys-tarfile {deb} | tar -x -C {dl} --wildcards '*/9pnet_virtio.ko*'",
                shell=True,
                check=True,
            )
            found = next(dl.rglob("9pnet_virtio.ko*"))
            data = found.read_bytes()
            if found.suffix == ".xz":
                data = lzma.decompress(data)
            ko.write_bytes(data)
        finally:
            shutil.rmtree(dl, ignore_errors=True)
    root = work / "extra-root"
    (root / "lib" / "modules").mkdir(parents=True)
    shutil.copy(ko, root / "lib" / "modules" / "9pnet_virtio.ko")
    extra = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input=b"lib\nlib/modules\nlib/modules/9pnet_virtio.ko\n",
        capture_output=True,
        check=True,
    ).stdout
    out = work / "initrd-virtfs.img"
    base = (guest / "initramfs.img").read_bytes()
    # The kernel looks for an uncompressed cpio only at 4-byte offsets and skips zeros.
    out.write_bytes(base + b"\0" * (-len(base) % 4) + extra)
    return out


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


class Vm:
    """One QEMU booted like spectrumd boots the embedded guest, plus its sockets."""

    def __init__(self, guest: Path, initrd: Path, run: Path, fs_port: bool, extra: list[str]):
        self.run = run
        self.console = bytearray()
        self.lines: list[str] = []
        append = "console=ttyS0 panic=-1 quiet"
        argv = [
            QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-kernel", str(guest / "vmlinuz"), "-initrd", str(initrd),
            "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
            "-chardev", f"socket,id=console,path={run}/console.sock,server=on,wait=off",
            "-serial", "chardev:console",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=control,path={run}/control.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=control,name=org.spectrum_os.control",
        ]  # fmt: skip
        if fs_port:
            argv += [
                "-chardev", f"socket,id=fs,path={run}/fs.sock,server=on,wait=off",
                "-device", "virtserialport,bus=vser0.0,chardev=fs,name=org.spectrum_os.fs",
            ]  # fmt: skip
        argv += extra
        self.append = append
        self.argv = argv

    def start(self, append_extra: str = "") -> None:
        argv = [*self.argv, "-append", self.append + append_extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        self.qmp = connect(f"{self.run}/qmp.sock", deadline)
        self.con = connect(f"{self.run}/console.sock", deadline)
        self.ctl = connect(f"{self.run}/control.sock", deadline)
        threading.Thread(target=self._pump, args=(self.con, self.console), daemon=True).start()
        self.ctl_buf = bytearray()
        threading.Thread(target=self._pump, args=(self.ctl, self.ctl_buf), daemon=True).start()

    def fs_socket(self) -> socket.socket:
        return connect(f"{self.run}/fs.sock", time.monotonic() + 10)

    def cont(self) -> None:
        f = self.qmp.makefile("rwb", buffering=0)
        f.readline()
        for cmd in (b'{"execute":"qmp_capabilities"}\n', b'{"execute":"cont"}\n'):
            f.write(cmd)
            f.readline()

    @staticmethod
    def _pump(sock: socket.socket, into: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                into += data

    def run_script(self, script: str, timeout: float) -> dict[str, list[str]]:
        deadline = time.monotonic() + 60
        while b"ready\n" not in self.ctl_buf:
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest not ready:\n{self.console.decode(errors='replace')}")
            time.sleep(0.05)
        self.ctl.sendall(b"run " + base64.b64encode(script.encode()) + b"\n")
        deadline = time.monotonic() + timeout
        while b"exited " not in self.ctl_buf:
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest script timed out:\n{self.console[-3000:].decode()}")
            time.sleep(0.1)
        # The console may lag behind the control port.
        deadline = time.monotonic() + 5
        while b"BENCH stat" not in self.console and time.monotonic() < deadline:
            time.sleep(0.05)
        text = self.console.decode(errors="replace")
        if "BENCH-ERR" in text or b"exited 0" not in self.ctl_buf:
            raise RuntimeError(f"guest script failed:\n{text[-3000:]}")
        return {m[1]: m[2].split() for m in re.finditer(r"BENCH (\w+) ([\d. ]+)", text)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.qmp, self.con, self.ctl):
            s.close()


def figures(res: dict[str, list[str]]) -> dict[str, float]:
    def secs(k: str) -> float:
        return max(float(res[k][1]) - float(res[k][0]), 0.01)

    n = int(res["stat"][2])
    if n != N_DIRS * N_FILES:
        raise RuntimeError(f"ls -lR saw {n} files, not {N_DIRS * N_FILES}")
    return {
        "read MB/s": BIG_MIB * MIB / 1e6 / secs("read"),
        "write MB/s": BIG_MIB * MIB / 1e6 / secs("write"),
        "stat ops/s": n / secs("stat"),
    }


def serve_ours(sock: socket.socket, export: Path, run: Path) -> list[subprocess.Popen[bytes]]:
    ctl = run / "fsctl.sock"
    argv = [sys.executable, "-m", "spectrumd.fileserver", "--control", str(ctl)]
    if SERVER_USER:
        argv += ["--user", SERVER_USER]
    server = subprocess.Popen(
        argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL
    )

    async def hand_over() -> None:
        client = FileServerClient()
        await client.connect(str(ctl))
        await client.set_exports("bench", {"b": (str(export), True)})
        await client.serve("bench", sock)
        client.close()  # the server keeps serving its connections

    asyncio.run(hand_over())
    sock.close()
    return [server]


def serve_diod(sock: socket.socket, export: Path, run: Path) -> list[subprocess.Popen[bytes]]:
    fd = sock.fileno()
    diod = subprocess.Popen(
        ["diod", "-f", "-n", "-S", "-U", "root", "-e", str(export),
         "-r", str(fd), "-w", str(fd), "-L", str(run / "diod.log")],
        pass_fds=(fd,), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    sock.close()
    return [diod]


def bench_one(kind: str, guest: Path, initrd: Path, export: Path, work: Path) -> dict[str, float]:
    run = Path(tempfile.mkdtemp(prefix=f"fsb-{kind}.", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    (export / "out").unlink(missing_ok=True)
    vm: Vm | None = None
    try:
        if kind == "virtfs":
            vm = Vm(guest, initrd, run, fs_port=False, extra=[
                "-virtfs",
                f"local,path={export},mount_tag=bench,security_model=none,id=bench",
            ])  # fmt: skip
            vm.start()
            mount = (
                "insmod /lib/modules/9pnet_virtio.ko; mkdir -p /mnt/v; mount -t 9p -o "
                "trans=virtio,version=9p2000.L,msize=524288,cache=none bench /mnt/v || exit 1\n"
                "D=/mnt/v\n"
            )
        else:
            vm = Vm(guest, initrd, run, fs_port=True, extra=[])
            vm.start(f" spectrum.fs_options=aname={export}" if kind == "diod" else "")
            start: Callable[..., list[subprocess.Popen[bytes]]] = (
                serve_ours if kind == "spectrumd" else serve_diod
            )
            procs += start(vm.fs_socket(), export, run)
            mount = "D=/mnt/spectrum/b\n" if kind == "spectrumd" else "D=/mnt/spectrum\n"
        vm.cont()
        res = vm.run_script(mount + GUEST_SCRIPT, timeout=240)
        if (export / "out").stat().st_size != BIG_MIB * MIB:
            raise RuntimeError(f"{kind}: the written file has the wrong size")
        return figures(res)
    finally:
        if vm is not None:
            vm.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(os.environ.get("SPECTRUMD_GUEST_DIR", "/var/cache/spectrumd/guest")),
    )
    ap.add_argument("--only", choices=["spectrumd", "diod", "virtfs"], action="append")
    args = ap.parse_args()
    guest: Path = args.guest_dir
    if not (guest / "vmlinuz").exists():
        print(f"no guest in {guest}: run make guest", file=sys.stderr)
        return 1
    for tool in (QEMU, "diod", "cpio"):
        if shutil.which(tool) is None:
            print(f"fs_bench needs {tool}", file=sys.stderr)
            return 1
    if SERVER_USER:
        pwd.getpwnam(SERVER_USER)
    work = Path(tempfile.mkdtemp(prefix="fsb.", dir="/tmp"))
    work.chmod(0o755)
    results: dict[str, dict[str, float]] = {}
    try:
        export = make_files(work)
        initrd = virtfs_initrd(guest, work)
        for kind in args.only or ["spectrumd", "diod", "virtfs"]:
            t = time.monotonic()
            results[kind] = bench_one(kind, guest, initrd, export, work)
            print(f"{kind}: done in {time.monotonic() - t:.0f} s", file=sys.stderr)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"fs_bench: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    return 0


def print_table(results: dict[str, dict[str, float]]) -> None:
    kinds = list(results)
    names = ["read MB/s", "write MB/s", "stat ops/s"]
    print(f"{'':12}" + "".join(f"{k:>12}" for k in kinds) + f"{'ours/diod':>12}  target")
    for n in names:
        row = f"{n:12}" + "".join(f"{results[k][n]:12.1f}" for k in kinds)
        if "spectrumd" in results and "diod" in results:
            ratio = results["spectrumd"][n] / results["diod"][n]
            ok = "ok" if ratio >= 1 / TARGET else "MISSED"
            row += f"{ratio:12.2f}  >= {1 / TARGET:.2f} {ok}"
        print(row)
    print(
        f"(read/write: {BIG_MIB} MiB with dd bs=1M; stat: ls -lR of {N_DIRS * N_FILES} files;"
        " guest cache=none, TCG, 1 vCPU; virtfs is QEMU's virtio-9p, the ceiling)"
    )


if __name__ == "__main__":
    sys.exit(main())
