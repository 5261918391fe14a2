"""Names and MACs of spectrumd's taps and bridges (pure)."""

from __future__ import annotations

import itertools
import re

import pytest

from spectrumd.host import names
from spectrumd.host.netns import NetnsError, namespace_path

LONG = "a" * 63  # the longest valid resource or instance name
PAIRS = [
    (i, n)
    for i, n in itertools.product(["one", "two", "work-shell", LONG], ["lan", "b", "net-1", LONG])
]


def test_tap_and_bridge_names_fit_and_match_the_owned_pattern() -> None:
    for instance, network in PAIRS:
        for name in (names.tap_name(instance, network), names.bridge_name(network)):
            assert len(name.encode()) <= names.IFNAMSIZ == 15
            assert names.OWNED_NAME.fullmatch(name), name
    assert names.tap_name("one", "lan").startswith("spt")
    assert names.bridge_name("lan").startswith("spb")


def test_names_are_deterministic_and_distinct() -> None:
    assert names.tap_name("one", "lan") == names.tap_name("one", "lan")
    assert names.bridge_name("lan") == names.bridge_name("lan")
    taps = {names.tap_name(i, n) for i, n in PAIRS}
    assert len(taps) == len(PAIRS)
    # The separator keeps ("a-b", "c") and ("a", "b-c") apart.
    assert names.tap_name("a-b", "c") != names.tap_name("a", "b-c")
    # Another attempt gives another name; taps and bridges never share one.
    assert names.tap_name("one", "lan", 1) != names.tap_name("one", "lan")
    assert not taps & {names.bridge_name(n) for _, n in PAIRS}


def test_macs_are_locally_administered_unicast_and_deterministic() -> None:
    macs = set()
    for instance, network in PAIRS:
        mac = names.mac_address(instance, network)
        assert re.fullmatch("[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac), mac
        first = int(mac[:2], 16)
        assert first & 0x02, "not locally administered"
        assert not first & 0x01, "multicast"
        assert mac == names.mac_address(instance, network)
        macs.add(mac)
    assert len(macs) == len(PAIRS)
    assert names.bridge_mac("lan") != names.mac_address("one", "lan")
    assert int(names.bridge_mac("lan")[:2], 16) & 0x03 == 0x02


def test_ownership_needs_the_pattern_and_the_alias() -> None:
    tap = names.tap_name("one", "lan")
    assert names.is_owned(tap, names.tap_alias("one", "lan"))
    assert names.is_owned(names.bridge_name("lan"), names.bridge_alias("lan"))
    assert not names.is_owned(tap, None)
    assert not names.is_owned(tap, "someone else's")
    assert not names.is_owned("eth0", names.tap_alias("one", "lan"))
    assert not names.is_owned(tap + "0", names.tap_alias("one", "lan"))


def test_name_table_skips_names_held_by_other_keys() -> None:
    # A candidate function with collisions: every key's first name is "x0".
    table: names.NameTable[str] = names.NameTable(lambda key, n: f"x{n}" if n < 2 else key)
    assert table.allocate("a") == "x0"
    assert table.allocate("a") == "x0"  # the same key keeps its name
    assert table.allocate("b") == "x1"
    assert table.allocate("c") == "c"
    assert "x1" in table and len(table) == 3
    table.release("a")
    assert table.name_of("a") is None
    assert table.allocate("d") == "x0"  # freed names are reused


def test_name_table_runs_out() -> None:
    table: names.NameTable[str] = names.NameTable(lambda key, n: "same", attempts=3)
    table.allocate("a")
    with pytest.raises(names.NamesExhausted):
        table.allocate("b")
    assert table.name_of("b") is None and len(table) == 1


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.9.0.1/24", True),
        ("fd00::1/64", True),
        ("10.9.0.1", False),
        ("10.9.0.300/24", False),
        ("lan/24", False),
    ],
)
def test_host_address(value: str, ok: bool) -> None:
    if ok:
        assert str(names.parse_host_address(value)) == value
    else:
        with pytest.raises(ValueError, match=re.escape(repr(value))):
            names.parse_host_address(value)


def test_namespace_names() -> None:
    assert str(namespace_path("spt-x")) == "/run/netns/spt-x"
    assert str(namespace_path("/proc/1/ns/net")) == "/proc/1/ns/net"
    for bad in ("", "..", "a/b"):
        with pytest.raises(NetnsError):
            namespace_path(bad)
