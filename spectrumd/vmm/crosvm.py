"""The crosvm backend: a pure argv builder (``crosvm run``) and its sockets.

The grammar is upstream's (src/crosvm/cmdline.rs; see FACTS.md):
``--mem``, ``--cpus``, ``--initrd``, ``--params``, ``--socket``, ``--block
PATH[,ro=true]``, ``--pmem PATH,ro=true``, ``--net tap-fd=N,mac=M``,
``--wayland-sock PATH``, and ``--serial`` key=value lists. Two ``--serial``
keys are newer than FACTS.md's list, read from crosvm's
devices/src/serial_device.rs: ``name=`` (the virtio-console port name the
guest sees under /sys/class/virtio-ports) and ``input-unix-stream`` (read
the guest's input from the same socket; without it a unix-stream serial
device is output only).

crosvm has no ``-S``: the guest runs as soon as crosvm starts. crosvm
connects to its serial sockets instead of listening on them, so
:meth:`CrosvmBackend.prepare` listens before the spawn and
:mod:`spectrumd.vmm.relay` joins them to the paths the supervisor connects to.
crosvm connects once: a restarted daemon can re-adopt a crosvm VMM only if
those connections outlived the old daemon, kept by systemd's file descriptor
store (:attr:`CrosvmBackend.keeper`, set by the daemon where systemd runs).

Values in crosvm's key=value lists cannot hold ``,``, ``=`` or ``"`` without
quoting, which crosvm's parser has changed over time: such paths are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from pathlib import Path

from spectrumd.model.types import Accel, VmmKind
from spectrumd.vmm.base import VMM_DIR, EventHandler, VmmError, VmSpec
from spectrumd.vmm.crosvm_control import CrosvmControl
from spectrumd.vmm.relay import Keeper, SerialRelay

_SUN_PATH_MAX = 107
ARCHES = ("x86_64", "aarch64")
# crosvm numbers serial devices 1..4 per hardware kind.
MAX_PORTS = 4
_MAC_RE = re.compile("[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PORT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KV_UNSAFE = re.compile(r'[,="\n\0]')

# crosvm's exit codes (src/crosvm/sys/linux.rs ExitState; main.rs CommandStatus).
EXIT_REASONS = {
    0: "the guest powered off",
    32: "the guest rebooted",
    33: "the vmm crashed",
    34: "the guest panicked",
    35: "the guest's watchdog reset it",
}


def vmm_socket(spec: VmSpec, name: str) -> Path:
    """Where crosvm connects for ``name`` (``console.sock``, ``control.sock``, ...), or
    makes its control socket (``vmm.sock``): in the directory crosvm owns."""
    return spec.run_dir / VMM_DIR / name


def _path(what: str, path: Path, *, sock: bool = False, kv: bool = True) -> str:
    s = os.fspath(path)
    if not os.path.isabs(s):
        raise ValueError(f"{what} path is not absolute: {s!r}")
    if "\n" in s or "\0" in s:
        raise ValueError(f"{what} path contains a newline or NUL: {s!r}")
    if kv and _KV_UNSAFE.search(s):
        raise ValueError(f'{what} path contains one of , = " which crosvm cannot take: {s!r}')
    if sock and len(os.fsencode(s)) > _SUN_PATH_MAX:
        raise ValueError(f"{what} socket path is longer than {_SUN_PATH_MAX} bytes: {s!r}")
    return s


def _serial_sockets(spec: VmSpec) -> list[tuple[Path, Path]]:
    """(crosvm's path, the supervisor's path) for the console and each port."""
    pairs = [(vmm_socket(spec, spec.console_socket.name), spec.console_socket)]
    for port in spec.ports:
        host = spec.port_socket(port)
        pairs.append((vmm_socket(spec, host.name), host))
    return pairs


class CrosvmBackend:
    kind = VmmKind.crosvm
    # crosvm connects to the console and port sockets (the daemon listens).
    vmm_connects = True
    cpus_held = False  # no -S: the guest runs from the start

    def __init__(self) -> None:
        # Relays listening since prepare(), waiting for attach(), by run directory.
        self._prepared: dict[Path, list[SerialRelay]] = {}
        # Keeps crosvm's serial connections across daemon restarts; None: nowhere.
        self.keeper: Keeper | None = None

    def exit_reason(self, returncode: int) -> tuple[bool, str] | None:
        """(clean, reason) for a crosvm exit status; None if it means nothing special.

        crosvm says through its status why it ended (there is no QMP SHUTDOWN
        event): 0 is a guest power-off or a ``crosvm stop``.
        """
        reason = EXIT_REASONS.get(returncode)
        return None if reason is None else (returncode == 0, reason)

    def default_binary(self, arch: str) -> str:
        if arch not in ARCHES:
            raise ValueError(_arch_error(arch))
        return "crosvm"

    def kernel_console(self, arch: str) -> str:
        # crosvm emulates a 16550 UART on x86_64 and aarch64 alike.
        return "ttyS0"

    def argv(self, spec: VmSpec) -> list[str]:
        """The ``crosvm run`` command line for ``spec``; a pure function.

        Raises ValueError for a spec crosvm cannot run: ppc64le or another
        unknown architecture, accel other than kvm (crosvm has no emulator),
        a path crosvm's option syntax cannot carry, a socket path too long,
        more than four ports, a bad port name or network device.
        """
        if spec.arch not in ARCHES:
            raise ValueError(_arch_error(spec.arch))
        if spec.accel is not Accel.kvm:
            raise ValueError("crosvm runs guests only with KVM (accel kvm); use vmm qemu for tcg")
        if spec.memory_mib <= 0 or spec.vcpus <= 0:
            raise ValueError(f"bad VM size: {spec.memory_mib} MiB, {spec.vcpus} vCPUs")
        if "\0" in spec.cmdline:
            raise ValueError("kernel command line contains a NUL")
        if not 0 <= spec.hotplug_slots <= 32:
            raise ValueError(f"bad number of hot-plug slots: {spec.hotplug_slots}")
        if len(spec.ports) > MAX_PORTS:
            raise ValueError(f"crosvm has at most {MAX_PORTS} virtio-console ports")
        _path("run directory", spec.run_dir)

        argv = [
            spec.binary or "crosvm",
            "run",
            "--mem", str(spec.memory_mib),
            "--cpus", str(spec.vcpus),
            "--socket", _path("control", vmm_socket(spec, spec.control_socket.name), sock=True),
        ]  # fmt: skip
        console = _path("console", vmm_socket(spec, spec.console_socket.name), sock=True)
        argv += ["--serial", f"type=unix-stream,hardware=serial,num=1,path={console},console"]
        seen: set[str] = set()
        for num, port in enumerate(spec.ports, start=1):
            if not _PORT_RE.fullmatch(port):
                raise ValueError(f"bad port name {port!r}")
            sock = _path(f"port {port}", vmm_socket(spec, spec.port_socket(port).name), sock=True)
            if sock in seen:
                raise ValueError(f"two ports share the socket {sock!r}")
            seen.add(sock)
            argv += [
                "--serial",
                f"type=unix-stream,hardware=virtio-console,num={num},name={port},"
                f"input-unix-stream,path={sock}",
            ]
        if spec.initrd is not None:
            argv += ["--initrd", _path("initrd", spec.initrd, kv=False)]
        if spec.cmdline:
            argv += ["--params", spec.cmdline]
        if spec.root_image is not None:
            root = _path("root image", spec.root_image)
            # Shared: virtio-pmem, mapped from the host's page cache (DAX), one
            # copy for every VM of the application. Else a read-only disk.
            argv += ["--pmem" if spec.share_root else "--block", f"{root},ro=true"]
        for disk in spec.disks:
            path = _path("disk", disk.path)
            argv += ["--block", path if disk.writable else f"{path},ro=true"]
        for net in spec.nets:
            if not _MAC_RE.fullmatch(net.mac) or net.tap_fd < 0:
                raise ValueError(f"bad network device {net!r}")
            argv += ["--net", f"tap-fd={net.tap_fd},mac={net.mac}"]
        for wl in spec.wayland_sockets:
            argv += ["--wayland-sock", _path("wayland", wl, sock=True)]
        if spec.fs_fd is not None:
            sock = _path("virtio-fs socket", spec.fs_vhost_socket, sock=True)
            argv += ["--vhost-user", f"fs,socket={sock}"]
        if spec.hotplug_slots:
            # For `crosvm virtio-net add` (crosvm built with pci-hotplug).
            argv += ["--pci-hotplug-slots", str(spec.hotplug_slots)]
        argv.append(_path("kernel", spec.kernel, kv=False))
        return argv

    def prepare(
        self, spec: VmSpec, stack: contextlib.ExitStack | contextlib.AsyncExitStack
    ) -> VmSpec:
        """Listen where crosvm will connect (before the spawn). Raises OSError."""
        relays: list[SerialRelay] = []
        stack.callback(self._discard, spec.run_dir, relays)
        for vmm_path, host_path in _serial_sockets(spec):
            relays.append(
                SerialRelay(
                    vmm_path, host_path, self.keeper, kept_as(spec, host_path), owner=spec.vmm_uid
                )
            )
        self._prepared[spec.run_dir] = relays
        return spec

    def _discard(self, run_dir: Path, relays: list[SerialRelay]) -> None:
        if self._prepared.get(run_dir) is relays:
            del self._prepared[run_dir]
        for r in relays:
            r.close()

    async def attach(self, spec: VmSpec, on_event: EventHandler, timeout: float) -> CrosvmControl:
        """Start the serial relays and wait for crosvm's control socket.

        The control socket is a SOCK_SEQPACKET listener; it answers once crosvm
        has built the VM. A connect that succeeds is the readiness check: it
        costs no subprocess and sends crosvm no request (crosvm drops a control
        connection that closes without one). Raises VmmError.
        """
        del on_event  # crosvm reports nothing asynchronously; its exit status says it all
        relays = self._prepared.pop(spec.run_dir, None)
        if relays is None:  # not started by this daemon: re-adoption
            relays = self._kept_relays(spec)
        sock = vmm_socket(spec, spec.control_socket.name)
        control = CrosvmControl(spec.binary or "crosvm", sock, relays, uid=spec.vmm_uid)
        try:
            for r in relays:
                r.start()
            await wait_control_socket(sock, timeout)
        except BaseException:
            await control.close()
            raise
        return control

    def _kept_relays(self, spec: VmSpec) -> list[SerialRelay]:
        """Relays of a crosvm an earlier daemon started, from its kept connections."""
        if self.keeper is None:
            raise VmmError(
                "crosvm connects to its serial sockets only once, and nothing kept those "
                "connections (that needs systemd's file descriptor store)"
            )
        relays: list[SerialRelay] = []
        try:
            for vmm_path, host_path in _serial_sockets(spec):
                relays.append(
                    SerialRelay.adopt(vmm_path, host_path, self.keeper, kept_as(spec, host_path))
                )
        except OSError as e:
            for r in relays:
                r.close()
            raise VmmError(f"crosvm of {spec.instance}: {e}") from None
        return relays


def kept_as(spec: VmSpec, host_path: Path) -> str:
    """The name a serial connection is kept under: ``crosvm/INSTANCE/console.sock``."""
    return f"crosvm/{spec.instance}/{host_path.name}"


def _arch_error(arch: str) -> str:
    if arch == "ppc64le":
        return "crosvm does not support ppc64le; use vmm qemu"
    return f"crosvm does not know architecture {arch!r} (known: {', '.join(ARCHES)})"


async def wait_control_socket(path: Path, timeout: float) -> None:
    """Return once a SOCK_SEQPACKET connect to ``path`` succeeds. Raises VmmError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, os.fspath(path))
            return
        except (FileNotFoundError, ConnectionRefusedError) as e:
            last = e
        except OSError as e:
            raise VmmError(f"crosvm control socket {path}: {e}") from e
        finally:
            sock.close()
        if loop.time() + delay >= deadline:
            raise VmmError(
                f"crosvm control socket {path} did not answer within {timeout:g}s"
                + (f": {last}" if last else "")
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
