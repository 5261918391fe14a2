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

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from spectrumd.model.types import Accel, VmmKind
from spectrumd.vmm.base import EventHandler, GuestTimeout, NetDev, VmmError, VmSpec
from spectrumd.vmm.qmp import QmpClient, QmpError
from spectrumd.vmm.relay import listen_unix

# How long remove_net waits for the guest to release a device (DEVICE_DELETED).
UNPLUG_TIMEOUT = 5.0
# The xHCI controller's id; its USB bus is "xhci.0".
XHCI_ID = "xhci"
USB_BUS = f"{XHCI_ID}.0"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# virtio-pmem regions are mapped in whole 2 MiB pages.
PMEM_ALIGN = 2 * 1024 * 1024

# Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107


@attrs.frozen
class _Arch:
    binary: str
    machine: str
    # The guest's name for the serial port -serial wires up.
    console: str
    # Firmware by file name in QEMU's data directory. qboot jumps straight to
    # the kernel (PVH) and prints nothing, where SeaBIOS costs boot time and
    # writes escape sequences to the serial console (the instance's log).
    firmware: str | None = None
    # Machine options added under KVM.
    kvm_machine: str = ""
    # -cpu under TCG; None: the machine's default model.
    tcg_cpu: str | None = "max"
    # Hot-plugged PCI devices need a pcie-root-port each (q35, virt); the
    # pseries PHB takes them on its root bus.
    root_ports: bool = True
    # Shared root image as virtio-pmem (QEMU 7.2 has it on x86 only).
    pmem: bool = False


ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch(
        "qemu-system-x86_64", machine="q35", console="ttyS0", firmware="qboot.rom", pmem=True
    ),
    # GICv3 where the host has it; PL011 UART; direct kernel boot (no firmware).
    "aarch64": _Arch("qemu-system-aarch64", machine="virt,gic-version=max", console="ttyAMA0"),
    # The sPAPR VTY is hvc0. KVM on POWER is KVM-HV (a kernel on bare metal);
    # pseries' TCG default CPU is the newest POWER it emulates.
    "ppc64le": _Arch(
        "qemu-system-ppc64",
        machine="pseries",
        console="hvc0",
        kvm_machine="kvm-type=HV",
        tcg_cpu=None,
        root_ports=False,
    ),
}


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


def _chardev_socket(chardev_id: str, what: str, spec: VmSpec, path: Path) -> list[str]:
    """A listening chardev: on the socket the daemon made (``fd=``), else at ``path``."""
    fd = spec.listen_fd(path)
    where = f"fd={fd}" if fd is not None else f"path={opt_escape(_socket_path(what, path))}"
    return ["-chardev", f"socket,id={chardev_id},{where},server=on,wait=off"]


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


def _drive_args(drive_id: str, path: str, writable: bool, fds: tuple[int, ...] = ()) -> list[str]:
    """A virtio-blk disk; on ``fds`` (the daemon opened the file) through an fd set."""
    ro = "" if writable else ",readonly=on"
    argv = []
    if fds:
        # The set's number is its first descriptor's: unique, and read back in logs.
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={fds[0]},opaque={drive_id}"]
        path = f"/dev/fdset/{fds[0]}"
    return [
        *argv,
        "-drive", f"file={opt_escape(path)},if=none,id={drive_id},format=raw{ro}",
        "-device", f"virtio-blk-pci,drive={drive_id},id={drive_id}-dev",
    ]  # fmt: skip


class QemuBackend:
    kind = VmmKind.qemu
    # QEMU listens on its console and port sockets; the daemon connects.
    vmm_connects = False
    cpus_held = True  # -S: the CPUs wait for start_cpus

    def default_binary(self, arch: str) -> str:
        return _arch(arch).binary

    def kernel_console(self, arch: str) -> str:
        return _arch(arch).console

    def exit_reason(self, returncode: int) -> tuple[bool, str] | None:
        """None: QEMU tells why over QMP (SHUTDOWN events), not by its status."""
        return None

    def prepare(
        self, spec: VmSpec, stack: contextlib.ExitStack | contextlib.AsyncExitStack
    ) -> VmSpec:
        """Listening sockets for QMP, the console and the ports, made by the daemon in
        its own directory; QEMU inherits them and needs no path. Raises OSError."""
        fds = []
        for path in spec.sockets:
            sock = listen_unix(path)
            stack.callback(sock.close)
            fds.append((path.name, sock.fileno()))
        return attrs.evolve(spec, listen_fds=tuple(fds))

    def argv(self, spec: VmSpec) -> list[str]:
        """The QEMU command line for ``spec``; a pure function.

        Raises ValueError for a spec no QEMU could run: an unsupported
        architecture, a path with a newline or NUL, a socket path too long
        for a unix socket, two ports sharing one socket file, a Wayland
        socket (QEMU has no virtio-wl), a shared root image where QEMU 7.2
        has no virtio-pmem or whose size is not a multiple of 2 MiB.
        """
        arch = _arch(spec.arch)
        if spec.wayland_sockets:
            raise ValueError("QEMU has no virtio-wl; use vmm crosvm")
        pmem = spec.root_image is not None and spec.share_root
        if pmem and not arch.pmem:
            raise ValueError(f"QEMU 7.2 cannot share a root image (virtio-pmem) on {spec.arch}")
        if pmem and (spec.root_image_size <= 0 or spec.root_image_size % PMEM_ALIGN):
            raise ValueError(
                f"a shared root image must be a multiple of 2 MiB, not {spec.root_image_size} bytes"
            )
        if spec.hotplug_slots < 0 or spec.hotplug_slots > 32:
            raise ValueError(f"bad number of hot-plug slots: {spec.hotplug_slots}")
        if spec.memory_mib <= 0 or spec.vcpus <= 0:
            raise ValueError(f"bad VM size: {spec.memory_mib} MiB, {spec.vcpus} vCPUs")
        if "\0" in spec.cmdline:
            raise ValueError("kernel command line contains a NUL")
        kernel = _checked_path("kernel", spec.kernel)
        initrd = None if spec.initrd is None else _checked_path("initrd", spec.initrd)
        _checked_path("run directory", spec.run_dir)

        machine = arch.machine
        if spec.accel is Accel.kvm and arch.kvm_machine:
            machine += "," + arch.kvm_machine
        if spec.fs_fd is not None:
            if spec.fs_fd < 0 or not 0 < len(spec.fs_tag.encode()) <= 36 or "," in spec.fs_tag:
                raise ValueError(f"bad virtio-fs device: fd {spec.fs_fd}, tag {spec.fs_tag!r}")
            # vhost-user needs guest RAM the backend can map: a shared memfd.
            machine += ",memory-backend=mem"
        cpu = "host" if spec.accel is Accel.kvm else arch.tcg_cpu
        memory = f"{spec.memory_mib}M"
        if pmem:
            # virtio-pmem is a memory device: it needs a slot above guest RAM.
            pmem_mib = spec.root_image_size // (1024 * 1024)
            memory += f",slots=1,maxmem={spec.memory_mib + pmem_mib}M"
        argv = [
            spec.binary or arch.binary,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-S",
            # seccomp: no obsolete system calls, no setuid/setgid, no fork or
            # exec, no scheduler or resource changes; sets no_new_privs.
            "-sandbox", SANDBOX,
            "-machine", machine,
            "-accel", spec.accel.value,
        ]  # fmt: skip
        if cpu is not None:
            argv += ["-cpu", cpu]
        argv += ["-m", memory, "-smp", str(spec.vcpus)]
        if spec.fs_fd is not None:
            argv += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
        if arch.firmware is not None:
            argv += ["-bios", arch.firmware]
        argv += ["-kernel", kernel]
        if initrd is not None:
            argv += ["-initrd", initrd]
        argv += ["-append", spec.cmdline]

        if spec.listen_fd(spec.control_socket) is not None:
            argv += _chardev_socket("qmp", "control", spec, spec.control_socket)
            argv += ["-mon", "chardev=qmp,mode=control"]
        else:
            qmp = _socket_path("control", spec.control_socket)
            argv += ["-qmp", f"unix:{opt_escape(qmp)},server=on,wait=off"]
        argv += _chardev_socket("console", "console", spec, spec.console_socket)
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
            argv += _chardev_socket(f"port{i}", f"port {port}", spec, spec.port_socket(port))
            argv += [
                "-device",
                f"virtserialport,bus=vser0.0,chardev=port{i},name={opt_escape(port)}",
            ]
        for net in spec.nets:
            argv += net_args(net)
        if spec.fs_fd is not None:
            # QEMU 7.2 takes a connected socket for a client chardev (fd=N).
            # The guest kernel caps a request at (queue size - 4) pages: 1024
            # lets it send 1 MiB (its maximum) where the default 128 gives 496 KiB.
            argv += [
                "-chardev", f"socket,id=fs,fd={spec.fs_fd}",
                "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=fs,tag={spec.fs_tag}",
            ]  # fmt: skip
        if spec.root_image is not None:
            root = _checked_path("root image", spec.root_image)
            if pmem:
                # share=on maps the file MAP_SHARED: every VM of the application
                # reads the same host page cache. readonly=on maps it PROT_READ.
                argv += [
                    "-object",
                    f"memory-backend-file,id=rootmem,mem-path={opt_escape(root)},"
                    f"size={spec.root_image_size},share=on,readonly=on",
                    "-device", "virtio-pmem-pci,memdev=rootmem,id=root",
                ]  # fmt: skip
            else:
                argv += _drive_args("root", root, False, spec.disk_fd(spec.root_image))
        for i, disk in enumerate(spec.disks):
            path = _checked_path("disk", disk.path)
            argv += _drive_args(f"disk{i}", path, disk.writable, spec.disk_fd(disk.path))
        if arch.root_ports:
            for i in range(spec.hotplug_slots):
                argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1}"]
        if spec.usb:
            # Its bus is xhci.0: where usb_attach plugs devices.
            argv += ["-device", f"qemu-xhci,id={XHCI_ID}"]
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
        events = _Events(on_event)
        client = await QmpClient.connect(spec.control_socket, events.dispatch, timeout)
        slots = spec.hotplug_slots if _arch(spec.arch).root_ports else 0
        return QemuControl(client, events, hotplug_buses=[f"hp{i}" for i in range(slots)])


class _Events:
    """Passes QMP events on, and lets a caller wait for one (DEVICE_DELETED)."""

    def __init__(self, on_event: EventHandler) -> None:
        self._on_event = on_event
        self._waiters: list[tuple[str, Mapping[str, Any], asyncio.Future[None]]] = []

    def dispatch(self, name: str, data: Mapping[str, Any]) -> None:
        for ev, match, fut in list(self._waiters):
            if ev == name and not fut.done() and all(data.get(k) == v for k, v in match.items()):
                fut.set_result(None)
        self._on_event(name, data)

    def expect(self, name: str, **match: Any) -> asyncio.Future[None]:
        """A future that completes at the next event ``name`` whose data has ``match``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (name, match, fut)
        self._waiters.append(entry)
        fut.add_done_callback(lambda _: self._waiters.remove(entry))
        return fut


class QemuControl:
    """The QMP channel of one QEMU; implements :class:`~spectrumd.vmm.base.VmmControl`.

    Every method raises QmpError (a VmmError) if QEMU refuses the command and
    VmmError if the connection is lost before the answer.
    """

    def __init__(
        self,
        client: QmpClient,
        events: _Events | None = None,
        hotplug_buses: list[str] | None = None,
    ) -> None:
        self._qmp = client
        self._events = events or _Events(lambda name, data: None)
        # Free pcie-root-ports for hot-added devices; None: the root bus takes them.
        self._free_buses = hotplug_buses
        self._net_buses: dict[str, str | None] = {}

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
        """Hot-add virtio-net on ``net.tap_fd`` (sent to QEMU with SCM_RIGHTS).

        Raises VmmError (no free hot-plug slot) or QmpError; on failure
        nothing added stays behind.
        """
        net_args(net)  # validates id, mac and fd
        if net.id in self._net_buses:
            raise VmmError(f"network device {net.id} already exists")
        device: dict[str, Any] = {
            "driver": "virtio-net-pci",
            "netdev": net.id,
            "id": f"{net.id}-dev",
            "mac": net.mac,
        }
        bus = None
        if self._free_buses is not None:
            if not self._free_buses:
                raise VmmError("no free hot-plug slot (VmSpec.hotplug_slots)")
            bus = device["bus"] = self._free_buses[0]
        fdname = f"{net.id}-tap"
        await self._qmp.execute("getfd", {"fdname": fdname}, fds=(net.tap_fd,))
        try:
            # netdev_add takes the named fd over from the monitor.
            await self._qmp.execute(
                "netdev_add", {"type": "tap", "id": net.id, "fd": fdname, "vhost": False}
            )
        except BaseException:
            with contextlib.suppress(VmmError):
                await self._qmp.execute("closefd", {"fdname": fdname})
            raise
        try:
            await self._qmp.execute("device_add", device)
        except BaseException:
            with contextlib.suppress(VmmError):
                await self._qmp.execute("netdev_del", {"id": net.id})
            raise
        if bus is not None and self._free_buses is not None:
            self._free_buses.remove(bus)
        self._net_buses[net.id] = bus

    async def remove_net(self, net_id: str, timeout: float = UNPLUG_TIMEOUT) -> None:
        """Unplug the device, wait for the guest to release it, then drop the backend.

        PCI unplug needs the guest's consent: a guest that does not answer
        within ``timeout`` (or is not running) leaves the device in place and
        gets VmmError. Raises QmpError if QEMU refuses.
        """
        await self._device_del(
            f"{net_id}-dev", timeout, f"the guest did not release network device {net_id}"
        )
        await self._qmp.execute("netdev_del", {"id": net_id})
        bus = self._net_buses.pop(net_id, None)
        if bus is not None and self._free_buses is not None:
            self._free_buses.append(bus)

    async def usb_attach(self, fd: int, dev_id: str) -> str:
        """Plug ``usb-host`` on the xHCI bus, on the device open on ``fd``.

        QEMU 7.2's usb-host opens its ``hostdevice`` path with qemu_open, which
        takes ``/dev/fdset/N`` (an fd set filled by ``add-fd``) but not a
        ``getfd`` name: the descriptor goes over QMP with SCM_RIGHTS into a new
        fd set, the device is added, and the set is marked for removal (QEMU
        keeps it while the device uses it). Returns the device's QOM id.
        Raises QmpError (no xHCI bus; usb-host refused the descriptor).
        """
        if fd < 0:
            raise VmmError(f"bad descriptor for USB device {dev_id}")
        added = await self._qmp.execute("add-fd", {"opaque": f"usb {dev_id}"[:128]}, fds=(fd,))
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            raise VmmError(f"QMP add-fd returned an unexpected value: {added!r}")
        try:
            return await self.usb_add({"driver": "usb-host", "hostdevice": f"/dev/fdset/{fdset}"})
        finally:
            with contextlib.suppress(VmmError):
                await self._qmp.execute("remove-fd", {"fdset-id": fdset})

    async def usb_add(self, device: Mapping[str, Any]) -> str:
        """``device_add`` a USB device on the xHCI bus (usb-host, or an emulated one
        such as ``{"driver": "usb-kbd"}``); returns its new id. Raises QmpError."""
        # Random, not counted: a daemon that re-adopts this QEMU starts a new
        # QemuControl, and the ids of the devices attached before must not recur.
        qid = f"usb{secrets.token_hex(4)}"
        await self._qmp.execute("device_add", {**device, "id": qid, "bus": USB_BUS})
        return qid

    async def usb_detach(self, handle: str, timeout: float = UNPLUG_TIMEOUT) -> None:
        """``device_del``; QEMU unplugs USB devices at once (no guest consent), and
        says so with DEVICE_DELETED. Raises QmpError, VmmError (no event in time)."""
        await self._device_del(handle, timeout, f"QEMU did not unplug USB device {handle}")

    async def _device_del(self, device: str, timeout: float, late: str) -> None:
        """``device_del``, then wait for its DEVICE_DELETED. Raises QmpError, or
        VmmError("<late> within Ns") if the event does not come in time."""
        deleted = self._events.expect("DEVICE_DELETED", device=device)
        try:
            await self._qmp.execute("device_del", {"id": device})
            try:
                await asyncio.wait_for(asyncio.shield(deleted), timeout)
            except TimeoutError:
                raise GuestTimeout(f"{late} within {timeout:g}s") from None
        finally:
            deleted.cancel()

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
