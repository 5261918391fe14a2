"""The demo's Nix configuration, evaluated and run by a real spectrumd."""

from __future__ import annotations

import pytest

from tests.conftest import Daemon
from tests.images import python_image
from tests.integration.helpers import props, wait_for
from tests.nix.helpers import EXAMPLES, Nix

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_the_demo_instances_start_from_the_evaluated_configuration(
    daemon: Daemon, nix: Nix
) -> None:
    python_image()  # the demo's application runs from it
    r = nix.file(EXAMPLES / "demo.nix")
    assert r.error is None, r.error
    c = await daemon.start(r.value)
    names = ("work-shell", "home-shell")
    for name in names:
        await c.manager("StartInstance", "s", name)
    for name in names:
        p = await props(c, name)
        assert p["State"] == "running", p
        assert p["MainPID"] > 0
    assert (await props(c, "work-shell"))["Resources"] == ["lan", "docs"]
    for name in names:
        await c.instance_call(name, "Kill")
    for name in names:
        p = await wait_for(c, name, lambda p: p["State"] != "running", timeout=30)
        assert (p["State"], p["StateReason"]) == ("stopped", "killed"), p
