"""The seam between the supervisor and a VMM backend.

A backend is a module with a pure argv builder and a control client, chosen by
:class:`VmmKind` through the ``BACKENDS`` table in ``spectrumd.vmm``. The
supervisor spawns the argv itself (so every child is reaped in one place),
then calls :meth:`VmmBackend.attach` to reach the VMM's control channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from spectrumd.model.types import Accel, Disk, VmmKind

# Virtio-serial ports of the guest contract, by name → socket file name in run_dir.
PORT_CONTROL = "org.spectrum_os.control"
PORT_PORTAL = "org.spectrum_os.portal"
# The directory of run_dir that a VMM which makes its own sockets (crosvm) owns.
VMM_DIR = "vmm"
# crosvm's virtio-fs connection, in VMM_DIR (the daemon listens there).
FS_VHOST_SOCKET = "fs-vhost.sock"


def port_socket_name(port: str) -> str:
    """``org.spectrum_os.control`` → ``control.sock``."""
    return port.rsplit(".", 1)[-1] + ".sock"


@attrs.frozen
class NetDev:
    """A network interface backed by a tap the daemon opened (``tap_fd`` is inherited)."""

    id: str  # unique in the VM, e.g. "net0"
    tap_fd: int
    tap_name: str
    mac: str  # "02:xx:xx:xx:xx:xx", locally administered


@attrs.frozen
class VmSpec:
    """Everything a backend needs to build its command line; paths are absolute."""

    instance: str
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path | None
    cmdline: str
    # Directory private to this run: control, console and port sockets live here.
    run_dir: Path
    arch: str = "x86_64"
    # Names of the guest-contract ports to create (each backed by a unix socket
    # in run_dir, the VMM being the listening side).
    ports: tuple[str, ...] = (PORT_CONTROL,)
    binary: str | None = None  # override the backend's default binary
    nets: tuple[NetDev, ...] = ()
    # The application's root file-system image, always read-only. With
    # share_root it is mapped as persistent memory (crosvm --pmem, QEMU
    # virtio-pmem) so that every VM of the application shares its page cache;
    # root_image_size (bytes) is what QEMU's memory backend needs to know.
    root_image: Path | None = None
    root_image_size: int = 0
    share_root: bool = False
    disks: tuple[Disk, ...] = ()
    # Wayland compositor sockets (virtio-wl; crosvm only).
    wayland_sockets: tuple[Path, ...] = ()
    # Spare slots for hot-added devices (add_net): QEMU pcie-root-ports,
    # crosvm --pci-hotplug-slots.
    hotplug_slots: int = 0
    # A USB (xHCI) controller for passed-through devices. QEMU adds one
    # (qemu-xhci) only when asked: the guest's USB stack costs boot time.
    # crosvm always has its own.
    usb: bool = False
    # Listening sockets the daemon made for the VMM (a VMM that listens: QEMU), by
    # socket file name in run_dir (``vmm.sock``, ``console.sock``, ``control.sock``,
    # ...): the VMM inherits them and never needs to reach run_dir itself.
    listen_fds: tuple[tuple[str, int], ...] = ()
    # The uid (== gid) the VMM runs as; None: the daemon's own.
    vmm_uid: int | None = None
    # Disk images (and a root image on a disk) the daemon opened, by path: a
    # VMM of its own uid could not open them itself (QEMU: an fd set). Each has
    # a read-only descriptor, and a read-write one if the disk is writable
    # (QEMU opens a writable disk read-only too, to probe it).
    disk_fds: tuple[tuple[Path, tuple[int, ...]], ...] = ()
    # A virtio-fs device served by spectrumd.virtiofs over vhost-user: QEMU
    # gets fs_fd, one end of a connected socketpair (-chardev socket,fd=N);
    # crosvm connects to fs_vhost_socket, which the daemon listens on (fs_fd
    # is -1 then). Guest RAM is then shared memory (the backend maps it).
    fs_fd: int | None = None
    fs_tag: str = "spectrum"

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Descriptors the VMM must inherit."""
        fds = tuple(n.tap_fd for n in self.nets) + tuple(fd for _, fd in self.listen_fds)
        fds += tuple(fd for _, both in self.disk_fds for fd in both)
        return fds if self.fs_fd is None or self.fs_fd < 0 else (*fds, self.fs_fd)

    def disk_fd(self, path: Path | None) -> tuple[int, ...]:
        """The descriptors the daemon opened for the disk image at ``path`` (or none)."""
        return dict(self.disk_fds).get(path, ()) if path is not None else ()

    def listen_fd(self, path: Path) -> int | None:
        """The inherited listening socket for ``path`` (in run_dir), if the daemon made one."""
        return dict(self.listen_fds).get(path.name) if path.parent == self.run_dir else None

    @property
    def sockets(self) -> tuple[Path, ...]:
        """Every socket of the VMM's control, console and ports, in run_dir."""
        return (self.control_socket, self.console_socket, *map(self.port_socket, self.ports))

    @property
    def fs_vhost_socket(self) -> Path:
        """Where crosvm connects for the virtio-fs backend (``--vhost-user fs``), in the
        directory it owns (as for its serial sockets)."""
        return self.run_dir / VMM_DIR / FS_VHOST_SOCKET

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def control_socket(self) -> Path:
        """The VMM's own control socket (QMP for QEMU, crosvm's --socket)."""
        return self.run_dir / "vmm.sock"

    def port_socket(self, port: str) -> Path:
        return self.run_dir / port_socket_name(port)


EventHandler = Callable[[str, Mapping[str, Any]], None]


class VmmError(Exception):
    """The VMM's control channel failed or refused a command."""


class GuestTimeout(VmmError):
    """The guest did not do its part of a command in time (release a device)."""


class VmmControl(Protocol):
    """A connected control channel to one running VMM."""

    async def start_cpus(self) -> None:
        """Let the guest run (the VMM is started with its CPUs held)."""

    async def pause(self) -> None: ...

    async def query_status(self) -> str:
        """The VMM's run state as it reports it ("running", "paused", ...; "unknown")."""

    async def resume(self) -> None: ...

    async def powerdown(self) -> None:
        """Ask the guest to shut down (ACPI power button)."""

    async def quit(self) -> None:
        """Ask the VMM itself to exit now (the guest gets no say)."""

    async def request_exit(self) -> bool:
        """The stop step between the guest's power button and SIGTERM.

        crosvm: ``crosvm stop``. Returns False for a backend without such a
        step (QEMU's stop is power button → SIGTERM → SIGKILL).
        """

    async def add_net(self, net: NetDev) -> None:
        """Hot-add a network interface on ``net.tap_fd``. Raises VmmError."""

    async def remove_net(self, net_id: str) -> None:
        """Hot-remove the interface added as ``net_id``. Raises VmmError."""

    async def usb_attach(self, fd: int, dev_id: str) -> str:
        """Pass the USB device open on ``fd`` to the guest; return a handle for usb_detach.

        The VMM takes its own copy of ``fd``; the caller closes its own.
        ``dev_id`` is spectrumd's id of the device (for the VMM's records).
        Raises VmmError (e.g. the VM has no USB controller, or the VMM cannot
        use the device).
        """

    async def usb_detach(self, handle: str) -> None:
        """Unplug the device attached as ``handle``. Raises VmmError."""

    async def close(self) -> None: ...


class VmmBackend(Protocol):
    kind: VmmKind
    # True if the VMM connects to the console and port sockets (crosvm), False
    # if it listens on them (QEMU). The supervisor connects either way: for
    # crosvm, prepare() and attach() put a relay in between.
    vmm_connects: bool
    # True if the guest's CPUs wait for start_cpus (QEMU's -S); False if they
    # run as soon as the VMM does (crosvm). A stop during a start presses the
    # power button only once they may have run.
    cpus_held: bool

    def default_binary(self, arch: str) -> str: ...

    def kernel_console(self, arch: str) -> str:
        """The guest's name of the serial console this backend wires up (``ttyS0``, ...)."""

    def exit_reason(self, returncode: int) -> tuple[bool, str] | None:
        """What the VMM's exit status says: (clean, reason), or None if nothing."""

    def prepare(
        self, spec: VmSpec, stack: contextlib.ExitStack | contextlib.AsyncExitStack
    ) -> VmSpec:
        """Set up, before the spawn, what the VMM needs on the host side; the spec to run.

        QEMU gets listening sockets the daemon made (``listen_fds``); crosvm
        connects to its serial sockets at startup, so relays must listen before
        it is exec'd. Undo actions go on ``stack``. Raises OSError.
        """

    def argv(self, spec: VmSpec) -> list[str]:
        """The full command line, a pure function of ``spec``."""

    async def attach(self, spec: VmSpec, on_event: EventHandler, timeout: float) -> VmmControl:
        """Connect to the VMM started from ``argv(spec)``.

        Retries until its control socket answers or ``timeout`` passes.
        Raises VmmError (or TimeoutError) if it cannot.
        """
