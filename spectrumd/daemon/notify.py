"""sd_notify in a few lines of pure Python (no libsystemd needed)."""

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
