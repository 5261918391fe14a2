"""The QEMU backend: a pure argv builder and a QMP control channel.

QEMU is started with its CPUs held (``-S``) and without any default device;
the supervisor spawns the argv, attaches over QMP, and lets the guest run with
:meth:`QemuControl.start_cpus`.

Quoting rules (checked against QEMU 7.2): values parsed as QemuOpts
(``-chardev``, ``-device``, the ``unix:`` address of ``-qmp``) take a comma
as a separator, and a literal comma is written doubled. ``-kernel``,
``-initrd`` and ``-append`` are taken verbatim: doubling a comma there would
change the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from spectrumd.model.types import Accel, VmmKind
from spectrumd.vmm.base import EventHandler, NetDev, VmmError, VmSpec
from spectrumd.vmm.qmp import QmpClient, QmpError

# Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107


@attrs.frozen
class _Arch:
    binary: str
    # None: no argv for this architecture yet (the binary is still known).
    machine: str | None
    # Firmware by file name in QEMU's data directory. qboot jumps straight to
    # the kernel (PVH) and prints nothing, where SeaBIOS costs boot time and
    # writes escape sequences to the serial console (the instance's log).
    firmware: str | None = None


ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch("qemu-system-x86_64", machine="q35", firmware="qboot.rom"),
    "aarch64": _Arch("qemu-system-aarch64", machine=None),
    "ppc64le": _Arch("qemu-system-ppc64", machine=None),
}

_CPU = {Accel.kvm: "host", Accel.tcg: "max"}


def opt_escape(value: str) -> str:
    """Quote a value for a comma-separated QEMU option (``a,b`` → ``a,,b``)."""
    return value.replace(",", ",,")


def _checked_path(what: str, path: Path) -> str:
    s = os.fspath(path)
    if "\n" in s or "\0" in s:
        raise ValueError(f"{what} path contains a newline or NUL: {s!r}")
    if not os.path.isabs(s):
        raise ValueError(f"{what} path is not absolute: {s!r}")
    return s


def _socket_path(what: str, path: Path) -> str:
    s = _checked_path(what, path)
    if len(os.fsencode(s)) > _SUN_PATH_MAX:
        raise ValueError(f"{what} socket path is longer than {_SUN_PATH_MAX} bytes: {s!r}")
    return s


def _chardev_socket(chardev_id: str, path: str) -> list[str]:
    return ["-chardev", f"socket,id={chardev_id},path={opt_escape(path)},server=on,wait=off"]


_MAC_RE = re.compile("[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_ID_RE = re.compile("[a-z][a-z0-9]{0,15}")


def net_args(net: NetDev) -> list[str]:
    """``-netdev``/``-device`` for a tap the daemon opened (vhost-net is not used)."""
    if not _ID_RE.fullmatch(net.id) or not _MAC_RE.fullmatch(net.mac) or net.tap_fd < 0:
        raise ValueError(f"bad network device {net!r}")
    return [
        "-netdev", f"tap,id={net.id},fd={net.tap_fd},vhost=off",
        "-device", f"virtio-net-pci,netdev={net.id},id={net.id}-dev,mac={net.mac}",
    ]  # fmt: skip


def _arch(name: str) -> _Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ValueError(
            f"QEMU backend does not know architecture {name!r} (known: {', '.join(ARCHES)})"
        ) from None


class QemuBackend:
    kind = VmmKind.qemu

    def default_binary(self, arch: str) -> str:
        return _arch(arch).binary

    def argv(self, spec: VmSpec) -> list[str]:
        """The QEMU command line for ``spec``; a pure function.

        Raises ValueError for a spec no QEMU could run: an unsupported
        architecture, a path with a newline or NUL, a socket path too long
        for a unix socket, two ports sharing one socket file.
        """
        arch = _arch(spec.arch)
        if arch.machine is None:
            raise ValueError(f"QEMU backend cannot build a command line for {spec.arch} yet")
        if spec.memory_mib <= 0 or spec.vcpus <= 0:
            raise ValueError(f"bad VM size: {spec.memory_mib} MiB, {spec.vcpus} vCPUs")
        if "\0" in spec.cmdline:
            raise ValueError("kernel command line contains a NUL")
        kernel = _checked_path("kernel", spec.kernel)
        initrd = None if spec.initrd is None else _checked_path("initrd", spec.initrd)
        _checked_path("run directory", spec.run_dir)

        argv = [
            spec.binary or arch.binary,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-S",
            "-machine", arch.machine,
            "-accel", spec.accel.value,
            "-cpu", _CPU[spec.accel],
            "-m", f"{spec.memory_mib}M",
            "-smp", str(spec.vcpus),
        ]  # fmt: skip
        if arch.firmware is not None:
            argv += ["-bios", arch.firmware]
        argv += ["-kernel", kernel]
        if initrd is not None:
            argv += ["-initrd", initrd]
        argv += ["-append", spec.cmdline]

        qmp = _socket_path("control", spec.control_socket)
        argv += ["-qmp", f"unix:{opt_escape(qmp)},server=on,wait=off"]
        argv += _chardev_socket("console", _socket_path("console", spec.console_socket))
        argv += ["-serial", "chardev:console"]
        argv += ["-device", "virtio-serial-pci,id=vser0"]

        seen: dict[str, str] = {}
        for i, port in enumerate(spec.ports):
            if not port or "\0" in port or "\n" in port:
                raise ValueError(f"bad port name {port!r}")
            sock = _socket_path(f"port {port}", spec.port_socket(port))
            if sock in seen:
                raise ValueError(f"ports {seen[sock]!r} and {port!r} share the socket {sock!r}")
            seen[sock] = port
            argv += _chardev_socket(f"port{i}", sock)
            argv += [
                "-device",
                f"virtserialport,bus=vser0.0,chardev=port{i},name={opt_escape(port)}",
            ]
        for net in spec.nets:
            argv += net_args(net)
        return argv

    # The timeout parameter is the VmmBackend Protocol's signature.
    async def attach(
        self,
        spec: VmSpec,
        on_event: EventHandler,
        timeout: float,
    ) -> QemuControl:
        """Connect to the QMP socket of the QEMU started from ``argv(spec)``.

        Retries until the socket answers or ``timeout`` passes. A QEMU that
        fails at startup (e.g. an unreadable kernel) leaves its socket file
        behind but refuses connections, so race this against the process's
        exit. Raises VmmError.
        """
        client = await QmpClient.connect(spec.control_socket, on_event, timeout)
        return QemuControl(client)


class QemuControl:
    """The QMP channel of one QEMU; implements :class:`~spectrumd.vmm.base.VmmControl`.

    Every method raises QmpError (a VmmError) if QEMU refuses the command and
    VmmError if the connection is lost before the answer.
    """

    def __init__(self, client: QmpClient) -> None:
        self._qmp = client

    @property
    def closed(self) -> bool:
        return self._qmp.closed

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        return await self._qmp.execute(command, arguments)

    async def query_status(self) -> str:
        """QEMU's run state: ``prelaunch``, ``running``, ``paused``, ``shutdown``, …"""
        result = await self._qmp.execute("query-status")
        status = result.get("status") if isinstance(result, dict) else None
        if not isinstance(status, str):
            raise VmmError(f"QMP query-status returned an unexpected value: {result!r}")
        return status

    async def start_cpus(self) -> None:
        await self._qmp.execute("cont")

    async def pause(self) -> None:
        await self._qmp.execute("stop")

    async def resume(self) -> None:
        await self._qmp.execute("cont")

    async def powerdown(self) -> None:
        await self._qmp.execute("system_powerdown")

    async def request_exit(self) -> bool:
        return False

    async def add_net(self, net: NetDev) -> None:
        raise VmmError("network hot-add is not implemented for QEMU yet")

    async def remove_net(self, net_id: str) -> None:
        raise VmmError("network hot-remove is not implemented for QEMU yet")

    async def quit(self) -> None:
        """Make QEMU exit now. The connection closing before the reply is success."""
        try:
            await self._qmp.execute("quit")
        except QmpError:
            raise
        except VmmError:
            # Only a lost connection raises a plain VmmError: QEMU is exiting.
            pass

    async def wait_closed(self) -> None:
        """Return when the QMP connection has ended (QEMU exited, or close())."""
        await self._qmp.wait_closed()

    async def close(self) -> None:
        await self._qmp.close()
