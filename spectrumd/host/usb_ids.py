"""USB device identities: the ids spectrumd gives devices, and what a resource matches.

An id names one device for as long as it is plugged in, and it is the same
the next time it is plugged in, whatever bus and device numbers the kernel
gives it:

- ``VID:PID:SERIAL`` when the device reports a serial number, e.g.
  ``1050:0407:12345678``. The serial is percent-encoded: every byte of its
  UTF-8 form outside ``A-Z a-z 0-9 . _ ~ -`` is written ``%XX``, so an id
  never holds ``:``, ``@``, spaces or control characters of the device's own.
- ``VID:PID@LOCATION`` otherwise (or when another present device already has
  the same serial id): LOCATION is the controller's name in sysfs (a PCI
  address such as ``0000:00:14.0``), ``-``, and the chain of hub ports
  (``1.2``: port 2 of the hub on port 1), as udev's ``ID_PATH`` does. It
  names the socket, so the same device in another socket is another id.

VID and PID are four lower-case hex digits. Nothing here does I/O.
"""

from __future__ import annotations

import re
import urllib.parse

import attrs

from spectrumd.errors import InvalidArgument

MAX_ID = 512
HEX4 = re.compile("[0-9a-f]{4}")
_SERIAL = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})+")
_LOCATION = re.compile(r"[A-Za-z0-9._:+-]{1,200}")
_UNSAFE_LOCATION = re.compile(r"[^A-Za-z0-9._:+-]")
USB_GRANT_PREFIX = "usb:"


def encode_serial(serial: str) -> str:
    return urllib.parse.quote(serial, safe="")


def serial_id(vendor: str, product: str, serial: str) -> str:
    return f"{vendor}:{product}:{encode_serial(serial)}"


def location_id(vendor: str, product: str, location: str) -> str:
    return f"{vendor}:{product}@{location}"


def clean_location(controller: str, ports: str) -> str:
    """``0000:00:14.0`` + ``1.2`` → ``0000:00:14.0-1.2``; odd characters become ``_``."""
    return _UNSAFE_LOCATION.sub("_", f"{controller or 'usb'}-{ports}")[:200]


@attrs.frozen
class UsbMatch:
    """What a ``usb`` resource or grant selects: vendor and product, and a serial if given."""

    vendor: str
    product: str
    serial: str | None = None

    def matches(self, vendor: str, product: str, serial: str) -> bool:
        return (
            vendor == self.vendor
            and product == self.product
            and (self.serial is None or serial == self.serial)
        )

    def __str__(self) -> str:
        tail = "" if self.serial is None else f":{encode_serial(self.serial)}"
        return f"{USB_GRANT_PREFIX}{self.vendor}:{self.product}{tail}"


def _hex4(what: str, untrusted: str, whole: str) -> str:
    if not HEX4.fullmatch(untrusted):
        raise InvalidArgument(
            f'"{whole[:80]}" is not a USB device id: {what} must be 4 lower-case hex digits'
        )
    return untrusted


def _serial(untrusted: str, whole: str) -> str:
    if not _SERIAL.fullmatch(untrusted):
        raise InvalidArgument(
            f'"{whole[:80]}" is not a USB device id: bad serial (percent-encode '
            "characters outside A-Z a-z 0-9 . _ ~ -)"
        )
    try:
        serial = urllib.parse.unquote(untrusted, errors="strict")
    except UnicodeDecodeError:
        raise InvalidArgument(f'"{whole[:80]}": the serial is not UTF-8') from None
    if encode_serial(serial) != untrusted:
        raise InvalidArgument(
            f'"{whole[:80]}" is not a USB device id: write the serial as '
            f'"{encode_serial(serial)[:80]}"'
        )
    return serial


def check_id(untrusted_id: str) -> str:
    """A well-formed device id, as given. Raises InvalidArgument naming what is wrong."""
    if not untrusted_id or len(untrusted_id) > MAX_ID:
        raise InvalidArgument(f"a USB device id has 1 to {MAX_ID} characters")
    head, at, location = untrusted_id.partition("@")
    parts = head.split(":", 2)
    if len(parts) < 2 or (at and len(parts) != 2) or (not at and len(parts) != 3):
        raise InvalidArgument(
            f'"{untrusted_id[:80]}" is not a USB device id (VID:PID:SERIAL or VID:PID@LOCATION)'
        )
    _hex4("the vendor", parts[0], untrusted_id)
    _hex4("the product", parts[1], untrusted_id)
    if at:
        if not _LOCATION.fullmatch(location):
            raise InvalidArgument(f'"{untrusted_id[:80]}" is not a USB device id: bad location')
    else:
        _serial(parts[2], untrusted_id)
    return untrusted_id


def parse_match(untrusted: str) -> UsbMatch:
    """``usb:VID:PID[:SERIAL]`` (a grant's resource) → UsbMatch. Raises InvalidArgument.

    VID and PID are four hex digits (upper case is accepted and lowered);
    SERIAL is percent-encoded as in device ids.
    """
    if not untrusted.startswith(USB_GRANT_PREFIX) or len(untrusted) > MAX_ID:
        raise InvalidArgument(f'"{untrusted[:80]}" is not usb:VID:PID[:SERIAL]')
    parts = untrusted[len(USB_GRANT_PREFIX) :].split(":", 2)
    if len(parts) < 2:
        raise InvalidArgument(f'"{untrusted[:80]}" is not usb:VID:PID[:SERIAL]')
    vendor = _hex4("the vendor", parts[0].lower(), untrusted)
    product = _hex4("the product", parts[1].lower(), untrusted)
    serial = _serial(parts[2], untrusted) if len(parts) == 3 else None
    return UsbMatch(vendor, product, serial)
