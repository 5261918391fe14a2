"""sd_notify and the watchdog in a few lines of pure Python (no libsystemd needed)."""

import asyncio
import os
import socket


def sd_notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True


def start_watchdog() -> "asyncio.Task[None] | None":
    """Send WATCHDOG=1 from the event loop at half of $WATCHDOG_USEC (None if not asked).

    It runs on the loop on purpose: a loop that hangs stops the pings, and
    systemd restarts the daemon, which then re-adopts its VMMs.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    interval = int(usec) / 2e6

    async def ping() -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.ensure_future(ping())
