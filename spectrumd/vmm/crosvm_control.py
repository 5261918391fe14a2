"""crosvm's control subcommands, run as ``crosvm SUB [ARGS] SOCKET``.

crosvm's control-socket protocol is internal and changes between versions;
its own binary is the stable interface (FACTS.md). Each call is a child
process, bounded in time and always reaped; a failure is a VmmError carrying
what crosvm wrote on stderr.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from spectrumd.vmm.base import NetDev, VmmError
from spectrumd.vmm.relay import SerialRelay

DEFAULT_TIMEOUT = 10.0
_USB_OK = re.compile(r"^ok (\d+)\s*$", re.M)
# `crosvm virtio-net add` logs "Tap device NAME plugged to PCI bus N"; the
# control result prints as "add_ok N".
_PCI_BUS = re.compile(r"(?:plugged to PCI bus|add_ok) (\d+)")


# In the run directory while crosvm is suspended (a restarted daemon reads it).
SUSPENDED_MARKER = "suspended"


@attrs.frozen
class UsbDevice:
    port: int
    vendor: str
    product: str


class CrosvmControl:
    """Control of one running crosvm; implements :class:`~spectrumd.vmm.base.VmmControl`."""

    def __init__(
        self,
        binary: str,
        socket_path: Path,
        relays: Sequence[SerialRelay] = (),
        timeout: float = DEFAULT_TIMEOUT,
        uid: int | None = None,
    ) -> None:
        self.binary = binary
        self.socket_path = socket_path
        self.timeout = timeout
        # The VMM's own uid (== gid): the subcommands run as it, so a socket path
        # in the directory crosvm owns (a symlink planted there, say) is
        # reached with crosvm's rights, never root's. None: as the daemon.
        self.uid = uid
        self._relays = list(relays)
        # net id → PCI bus number crosvm gave the hot-added device.
        self._net_buses: dict[str, int] = {}

    async def run(self, *args: str, pass_fds: Sequence[int] = (), as_daemon: bool = False) -> str:
        """Run ``crosvm ARGS... SOCKET`` as the VMM's uid (``as_daemon``: as the
        daemon's own); return its stdout. Raises VmmError."""
        argv = [self.binary, *args, os.fspath(self.socket_path)]
        what = " ".join(args[:2]) if args[:1] == ("usb",) else args[0]
        ids: dict[str, Any] = {}
        if self.uid is not None and not as_daemon:
            ids = {"user": self.uid, "group": self.uid, "extra_groups": []}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=tuple(pass_fds),
                **ids,
            )
        except OSError as e:
            raise VmmError(f"crosvm {what}: cannot run {self.binary}: {e}") from e
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            raise VmmError(f"crosvm {what} did not finish within {self.timeout:g}s") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stdout = out.decode(errors="replace")
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip().splitlines()
            raise VmmError(
                f"crosvm {what} failed (status {proc.returncode})"
                + (f": {detail[-1]}" if detail else "")
            )
        return stdout + err.decode(errors="replace") if args[0] == "virtio-net" else stdout

    # -- VmmControl ------------------------------------------------------------

    async def start_cpus(self) -> None:
        """Nothing to do: crosvm has no ``-S``, the guest runs from the start."""

    @property
    def _suspended_marker(self) -> Path:
        return self.socket_path.parent / SUSPENDED_MARKER

    async def query_status(self) -> str:
        """crosvm cannot say whether it is suspended: the marker left by pause() does."""
        return "paused" if self._suspended_marker.exists() else "running"

    async def pause(self) -> None:
        await self.run("suspend")
        self._suspended_marker.touch()

    async def resume(self) -> None:
        await self.run("resume")
        self._suspended_marker.unlink(missing_ok=True)

    async def powerdown(self) -> None:
        await self.run("powerbtn")

    async def request_exit(self) -> bool:
        await self.run("stop")
        return True

    async def quit(self) -> None:
        await self.run("stop")

    async def add_net(self, net: NetDev) -> None:
        """``crosvm virtio-net add TAP_NAME`` (crosvm builds with pci-hotplug only).

        crosvm opens the tap by name itself, so it must see the tap (same
        network namespace); ``net.tap_fd`` is not used.
        """
        out = await self.run("virtio-net", "add", net.tap_name)
        m = _PCI_BUS.search(out)
        if m is None:
            raise VmmError(f"crosvm virtio-net add {net.tap_name}: no PCI bus in its answer")
        self._net_buses[net.id] = int(m.group(1))

    async def remove_net(self, net_id: str) -> None:
        """``crosvm virtio-net remove BUS``; BUS is what the add answered."""
        bus = self._net_buses.get(net_id)
        if bus is None:
            raise VmmError(
                f"crosvm removes a network device by the PCI bus of its hot-add; "
                f"{net_id} was not hot-added by this connection"
            )
        await self.run("virtio-net", "remove", str(bus))
        del self._net_buses[net_id]

    async def close(self) -> None:
        for r in self._relays:
            r.close()
        self._relays.clear()

    # -- crosvm only ------------------------------------------------------------

    async def usb_attach(self, fd: int, dev_id: str) -> str:
        """``crosvm usb attach 00:00:00:00 /proc/self/fd/N``: attach the device open
        on ``fd``; return the guest port crosvm answers (``ok PORT``). Raises VmmError.

        crosvm opens (dups) ``/proc/self/fd/N`` of the subcommand, which inherits
        ``fd`` (FACTS.md); the numbers before it are ignored when a path is given.
        That open is a new open of the device node, checked against its owner
        and mode, which the VMM's uid does not pass: this one subcommand runs
        as the daemon (README, *Honest limits*).
        """
        if fd < 0:
            raise VmmError(f"bad descriptor for USB device {dev_id}")
        out = await self.run(
            "usb", "attach", "00:00:00:00", f"/proc/self/fd/{fd}", pass_fds=(fd,), as_daemon=True
        )
        m = _USB_OK.search(out)
        if m is None:
            raise VmmError(f"crosvm usb attach {dev_id}: {out.strip()[:200] or 'no answer'}")
        return m.group(1)

    async def usb_detach(self, handle: str) -> None:
        """``crosvm usb detach PORT``. Raises VmmError."""
        if not handle.isdigit():
            raise VmmError(f"crosvm usb detach: {handle!r} is not a port")
        out = await self.run("usb", "detach", handle)
        if not out.startswith("ok"):
            raise VmmError(f"crosvm usb detach {handle}: {out.strip()[:200] or 'no answer'}")

    async def usb_list(self) -> list[UsbDevice]:
        """``devices PORT VID PID ...`` → the attached devices."""
        out = (await self.run("usb", "list")).strip()
        words = out.split()
        if not words or words[0] != "devices" or (len(words) - 1) % 3:
            raise VmmError(f"crosvm usb list: unexpected answer {out!r}")
        rest = words[1:]
        return [UsbDevice(int(rest[i]), rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]

    async def balloon(self, size_bytes: int) -> None:
        """Set the balloon to ``size_bytes`` (memory taken from the guest)."""
        if size_bytes < 0:
            raise ValueError("balloon size must not be negative")
        await self.run("balloon", str(size_bytes))

    async def balloon_stats(self) -> str:
        return (await self.run("balloon_stats")).strip()
