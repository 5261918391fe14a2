#!/usr/bin/env python3
"""Boot the embedded default guest under QEMU the way spectrumd does and
check the guest contract (guest/README.md).

Usage: guest/test_boot.py [OUTDIR]   (OUTDIR made by guest/build.sh;
default: the directory of $SPECTRUM_GUEST_DIR or /tmp/spectrum-guest)

Checks, one QEMU per check:
  run       ready arrives; hello -> ready; a run command's output reaches the
            serial console; a second run is ignored; exited 0 arrives; QEMU
            exits (the guest powers off after exited).
  acpi      after a control reconnect, hello -> ready; QMP system_powerdown
            ends QEMU within 10 s while the app runs.
  poweroff  host "poweroff" ends QEMU, also when the app ignores SIGTERM.
(The file tree is tested with spectrumd: tests/virtiofs/test_guest.py.)
Stdlib only.  Exit status 0 when every check passed.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0


def qemu_argv(out: str, run: str) -> list[str]:
    argv = [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-S",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-smp",
        "1",
        "-kernel",
        f"{out}/vmlinuz",
        "-initrd",
        f"{out}/initramfs.img",
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-qmp",
        f"unix:{run}/qmp.sock,server=on,wait=off",
        "-chardev",
        f"socket,id=console,path={run}/console.sock,server=on,wait=off",
        "-serial",
        "chardev:console",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        f"socket,id=control,path={run}/control.sock,server=on,wait=off",
        "-device",
        "virtserialport,bus=vser0.0,chardev=control,name=org.spectrum_os.control",
    ]
    return argv


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


class Guest:
    """One QEMU process with the host ends of its console, control and QMP."""

    def __init__(self, out: str) -> None:
        self.run = tempfile.mkdtemp(prefix="spectrum-guest-test.")
        self.console = bytearray()
        self.lines: queue.Queue[str] = queue.Queue()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(qemu_argv(out, self.run), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        self.qmp = connect(f"{self.run}/qmp.sock", deadline)
        self.con = connect(f"{self.run}/console.sock", deadline)
        self.ctl = connect(f"{self.run}/control.sock", deadline)
        self.qmp_file = self.qmp.makefile("rwb", buffering=0)
        threading.Thread(target=self._read_console, daemon=True).start()
        threading.Thread(target=self._read_control, args=(self.ctl,), daemon=True).start()
        json.loads(self.qmp_file.readline())  # greeting
        self.qmp_cmd("qmp_capabilities")
        self.qmp_cmd("cont")
        self.t_cont = time.monotonic()

    def _read_console(self) -> None:
        while data := self.con.recv(65536):
            self.console += data

    def reconnect_control(self) -> None:
        """Drop the control connection and connect again, as a restarted host would."""
        self.ctl.shutdown(socket.SHUT_RDWR)
        self.ctl.close()
        time.sleep(1)
        self.ctl = connect(f"{self.run}/control.sock", time.monotonic() + 5)
        threading.Thread(target=self._read_control, args=(self.ctl,), daemon=True).start()

    def _read_control(self, sock: socket.socket) -> None:
        buf = b""
        while data := sock.recv(4096):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.put(line.decode("utf-8", "replace"))

    def qmp_cmd(self, name: str) -> dict[str, Any]:
        self.qmp_file.write(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            msg: dict[str, Any] = json.loads(self.qmp_file.readline())
            if "return" in msg or "error" in msg:
                return msg

    def send(self, line: str) -> None:
        self.ctl.sendall(line.encode() + b"\n")

    def expect(self, want: str, timeout: float) -> str:
        """Wait for a control line starting with `want`, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {want!r} from the guest within {timeout} s") from None
            if line.startswith(want):
                return line

    def wait_console(self, marker: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.console:
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} not on the console within {timeout} s")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> float:
        t = time.monotonic()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU still running after {timeout} s") from None
        return time.monotonic() - t

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.qmp, self.con, self.ctl):
            s.close()
        shutil.rmtree(self.run, ignore_errors=True)


def b64(cmd: str) -> str:
    return base64.b64encode(cmd.encode()).decode()


def check_run(g: Guest) -> str:
    g.expect("ready", READY_TIMEOUT)
    ready = time.monotonic() - g.t_cont
    g.send("hello")
    g.expect("ready", 5)
    g.send("run " + b64("echo 'app-out-1 ünï'; echo app-err-1 >&2; sleep 1; exit 0"))
    g.send("run " + b64("echo second-run-must-not-appear"))
    g.wait_console("app-out-1 ünï".encode(), 10)
    g.wait_console(b"app-err-1", 10)
    line = g.expect("exited", 15)
    assert line == "exited 0", line
    took = g.wait_exit(EXIT_TIMEOUT)
    assert b"second-run-must-not-appear" not in g.console, "second run was not ignored"
    total = ready + g.t_cont - g.t0
    return (
        f"boot-to-ready {ready:.2f} s (from process start {total:.2f} s),"
        f" exit after 'exited' {took:.2f} s"
    )


def check_acpi(g: Guest) -> str:
    g.expect("ready", READY_TIMEOUT)
    g.send("run " + b64("echo acpi-app-up; exec sleep 1000"))
    g.wait_console(b"acpi-app-up", 10)
    g.reconnect_control()
    g.send("hello")
    g.expect("ready", 5)
    assert g.qmp_cmd("system_powerdown").get("return") == {}, "system_powerdown failed"
    took = g.wait_exit(EXIT_TIMEOUT)
    assert b"powering off (power button)" in g.console, "acpid did not run the handler"
    return f"hello after a control reconnect answered; exited {took:.2f} s after system_powerdown"


def check_poweroff(g: Guest) -> str:
    g.expect("ready", READY_TIMEOUT)
    g.send("run " + b64("trap '' TERM; echo stubborn-app-up; while :; do sleep 1; done"))
    g.wait_console(b"stubborn-app-up", 10)
    t = time.monotonic()
    g.send("poweroff")
    g.wait_exit(EXIT_TIMEOUT)
    took = time.monotonic() - t
    exited = [line for line in iter_queue(g.lines) if line.startswith("exited")]
    return f"QEMU exited {took:.2f} s after 'poweroff' (app ignoring SIGTERM; reported {exited})"


def iter_queue(q: queue.Queue[str]) -> Iterator[str]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def main() -> int:
    args = sys.argv[1:]
    out = args[0] if args else os.environ.get("SPECTRUM_GUEST_DIR", "/tmp/spectrum-guest")
    if not (os.path.exists(f"{out}/vmlinuz") and os.path.exists(f"{out}/initramfs.img")):
        print(f"no guest in {out}: run guest/build.sh {out} first", file=sys.stderr)
        return 2
    checks = [("run", check_run), ("acpi", check_acpi), ("poweroff", check_poweroff)]
    failed = 0
    for name, check in checks:
        g = Guest(out)
        try:
            print(f"PASS {name}: {check(g)}")
        except AssertionError as e:
            failed += 1
            print(
                f"FAIL {name}: {e}\n--- console ---\n"
                + g.console.decode("utf-8", "replace")
                + "--- end console ---"
            )
        finally:
            g.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
