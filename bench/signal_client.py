"""The client end of bench/run.py's signal latency: stamps each PropertiesChanged on arrival.

Usage: python bench/signal_client.py BUS_ADDRESS SENDER PATH

Prints ``ready`` once its match rule is in place, then one line per
PropertiesChanged from SENDER on PATH that carries State:
``<CLOCK_REALTIME ns> <State>``. Ends when its standard input closes.
"""

from __future__ import annotations

import asyncio
import sys
import time

from dbus_fast import Message
from dbus_fast.aio import MessageBus


async def main(address: str, sender: str, path: str) -> None:
    bus = await MessageBus(bus_address=address).connect()

    def on_message(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path == path:
            now = time.time_ns()
            state = msg.body[1].get("State")
            if state is not None:
                sys.stdout.write(f"{now} {state.value}\n")
                sys.stdout.flush()

    bus.add_message_handler(on_message)
    rule = (
        f"type='signal',sender='{sender}',path='{path}',"
        "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"
    )
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    bus.disconnect()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: signal_client.py BUS_ADDRESS SENDER PATH")
    asyncio.run(main(*sys.argv[1:]))
