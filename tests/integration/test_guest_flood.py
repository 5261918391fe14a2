"""A real guest floods its portal port and never reads: it loses the port, the daemon stays."""

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.integration.helpers import app_config, props, wait_log
from tests.integration.test_grants import register_agent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# One well-formed request (for /tmp, left open at the agent), then 2^15 lines of
# "request a" (320 KiB) written 40 times over the same open of the port, which is
# never read. Each is answered "malformed" (about 40 bytes).
FLOODER = (
    "for f in /sys/class/virtio-ports/*/name; do "
    '[ "$(cat $f)" = org.spectrum_os.portal ] && d=${f%/name} && dev=/dev/${d##*/}; done; '
    "echo 'request a' > /tmp/f; i=0; "
    "while [ $i -lt 15 ]; do cat /tmp/f /tmp/f > /tmp/g; mv /tmp/g /tmp/f; i=$((i+1)); done; "
    'echo "flooding $dev"; exec 3<>$dev; echo "request q dir L3RtcA== ro running" >&3; n=0; '
    "while [ $n -lt 40 ]; do cat /tmp/f >&3 || break; n=$((n+1)); done; "
    'echo "flood done n=$n"; exec sleep 600'
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_guest_flooding_its_portal_loses_the_port_not_the_daemon_its_memory(
    daemon: Daemon,
) -> None:
    c = await daemon.start(app_config(FLOODER))
    assert daemon.proc is not None
    _agent_client, agent = await register_agent(daemon.address, None)  # never answers
    await c.manager("StartInstance", "s", "one")
    rss_before = rss_kib(daemon.proc.pid)
    log = Path((await props(c, "one"))["ConsoleLog"])
    await wait_log(log, "flooding /dev/vport", timeout=90)
    deadline = time.monotonic() + 120
    warning = "WARNING spectrumd.supervisor.instance.one: portal: closing the channel"
    while warning not in daemon.stderr_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the daemon never gave up the flooding guest's port"
        await asyncio.sleep(0.5)
    grown = rss_kib(daemon.proc.pid) - rss_before
    assert grown < 20 * 1024, f"the daemon's RSS grew by {grown} KiB"
    # Logged once, and the daemon and the instance carry on.
    assert daemon.stderr_path.read_text(errors="replace").count(warning) == 1
    assert (await props(c, "one"))["State"] == "running"
    (rows,) = await c.manager("ListInstances")
    assert [r[0] for r in rows] == ["one"]
    # The question the guest asked before flooding is taken off the agent: no one
    # is left to hear its answer.
    assert [a[3] for a in agent.asked] == ["/tmp"]
    deadline = time.monotonic() + 10
    while not agent.cancelled:
        assert time.monotonic() < deadline, "the agent's question was never cancelled"
        await asyncio.sleep(0.2)
    assert agent.cancelled == [agent.asked[0][0]]
    await c.instance_call("one", "Kill")
