"""``spectrumctl usb list|attach NAME ID|detach NAME ID``."""

import argparse
import json
from typing import Any

from spectrumd.bus.names import INSTANCE_IFACE
from spectrumd.cli.client import Client

KEYS = ("id", "vendor", "product", "serial", "description", "holder")


def add_parsers(sub: Any) -> None:
    usb = sub.add_parser("usb", help="host USB devices and their passthrough")
    usb_sub = usb.add_subparsers(dest="usb_command", required=True)
    usb_sub.add_parser("list", help="list host USB devices and which instance holds each")
    for action, prep in (("attach", "to"), ("detach", "from")):
        p = usb_sub.add_parser(action, help=f"{action} a USB device {prep} a running instance")
        p.add_argument("name")
        p.add_argument("id", help="a device id as `spectrumctl usb list` prints it")


async def cmd_usb(c: Client, args: argparse.Namespace) -> None:
    if args.usb_command == "list":
        (rows,) = await c.manager("ListUsbDevices")
        if args.json:
            print(json.dumps([dict(zip(KEYS, r, strict=True)) for r in rows], indent=2))
            return
        print(f"{'ID':<32} {'HOLDER':<16} DESCRIPTION")
        for dev_id, _vendor, _product, _serial, description, holder in rows:
            print(f"{dev_id:<32} {holder or '-':<16} {description}")
        return
    member = "AttachUsb" if args.usb_command == "attach" else "DetachUsb"
    path = await c.instance_path(args.name)
    await c.call(path, INSTANCE_IFACE, member, "s", [args.id])
