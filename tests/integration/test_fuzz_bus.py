"""Fuzz the D-Bus methods' arguments (hypothesis) against one real daemon.

Every error reply must be one of the documented ``org.spectrum_os.Spectrum1.Error.*``
names with a message for a person: never ``org.freedesktop.DBus.Error.*`` from a
Python exception, never the "internal error" that a bug reaching the bus layer
becomes, and no ``Failed`` (the host failed) except for a USB grant, whose outcome
depends on the host's devices. Where the outcome is fully determined by the
arguments (names, lookups, CreateInstance), the exact error is checked too.
Afterwards the daemon still answers, no VMM is left behind, and a restart reads
back what the fuzzing wrote.

hypothesis runs in a worker thread; each example's calls run on the session event
loop through ``run_coroutine_threadsafe``, so the one daemon serves the whole module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from dbus_fast import Variant
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spectrumd.bus.grants import GRANT_IFACE
from spectrumd.bus.names import ERROR_PREFIX, INSTANCE_IFACE, instance_path
from spectrumd.cli.client import CallError, Client
from spectrumd.errors import ERROR_NAMES
from tests.conftest import Daemon, kill_leftover_vmms
from tests.integration.helpers import props

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
CONFIGURED = ("one", "live")
MAX_MESSAGE = 1024

SETTINGS = settings(
    deadline=None,
    database=None,  # nothing written into the source tree
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def fuzz_config() -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 0},
        "applications": {"app": {"command": "exec sleep 600", "memory_mib": 64}},
        "resources": {
            "lan": {"type": "network"},
            "docs": {"type": "directory", "path": "/usr/share/doc"},
        },
        "instances": {
            "one": {"application": "app"},
            "live": {"application": "app", "resources": ["lan", "docs"]},
        },
    }


# -- the shared daemon -------------------------------------------------------------


class Fuzz:
    """The daemon under fuzz, a client, and a bridge from hypothesis' thread to the loop."""

    def __init__(self, d: Daemon, c: Client, loop: asyncio.AbstractEventLoop) -> None:
        self.d = d
        self.c = c
        self.loop = loop
        self.replies: collections.Counter[tuple[str, str]] = collections.Counter()
        self.created: set[str] = set()
        self.failed: list[str] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(
        self, what: str, coro: Coroutine[Any, Any, Any], host_dependent: bool = False
    ) -> tuple[Any, CallError | None]:
        """Run one D-Bus call; check and return its error, if any.

        ``Failed`` means the host failed; only a ``host_dependent`` call (one whose
        outcome depends on the host's hardware, such as a USB grant) may get it.
        """
        try:
            result = self.run(coro)
        except CallError as e:
            check_error(what, e)
            self.replies[(what, e.short)] += 1
            if e.short == "Failed" and not host_dependent:
                self.failed.append(f"{what}: {e.message}")
            return None, e
        self.replies[(what, "ok")] += 1
        return result, None

    def manager(
        self, member: str, signature: str, *args: Any, host_dependent: bool = False
    ) -> tuple[Any, CallError | None]:
        return self.call(member, self.c.manager(member, signature, *args), host_dependent)

    def instance(
        self, name: str, member: str, signature: str = "", *args: Any
    ) -> tuple[Any, CallError | None]:
        return self.call(
            f"Instance.{member}",
            self.c.call(instance_path(name), INSTANCE_IFACE, member, signature, list(args)),
        )

    def state(self, name: str) -> dict[str, Any]:
        return self.run(props(self.c, name))  # type: ignore[no-any-return]


def check_error(what: str, e: CallError) -> None:
    assert e.name.startswith(ERROR_PREFIX), f"{what}: {e.name}: {e.message}"
    assert e.short in ERROR_NAMES, f"{what}: undocumented error {e.name}: {e.message}"
    assert "internal error" not in e.message, f"{what}: a bug reached the bus: {e.message}"
    assert 0 < len(e.message) <= MAX_MESSAGE, f"{what}: message of {len(e.message)} chars"


@pytest.fixture(scope="module")
def fuzz_netns() -> Iterator[str]:
    name = f"spt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzz(
    dbus_address: str, guest_dir: Path, short_tmp: Path, fuzz_netns: str
) -> AsyncIterator[Fuzz]:
    workdir = Path(tempfile.mkdtemp(prefix="fz.", dir=short_tmp))
    d = Daemon(dbus_address, workdir, guest_dir)
    try:
        c = await d.start(fuzz_config(), extra_args=["--netns", fuzz_netns])
        await c.manager("StartInstance", "s", "live")
        yield Fuzz(d, c, asyncio.get_running_loop())
    finally:
        await d.stop()
        kill_leftover_vmms(d.state_dir)
        shutil.rmtree(workdir, ignore_errors=True)


# -- strategies ----------------------------------------------------------------------

# D-Bus strings are UTF-8 without NUL; anything else is refused by the client library.
chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
text = st.text(chars, max_size=80)
long_text = st.builds(
    lambda c, n: c * n, st.sampled_from(["a", "é", "-", "/", "😀"]), st.integers(60, 6000)
)
valid_name = st.from_regex(NAME_RE, fullmatch=True)
tricky_names = st.sampled_from(
    ["", "-a", "A", "a" * 63, "a" * 64, "one\n", " one", "one ", "ONE", "o/ne", "é", "..", "a_b"]
)
names = st.one_of(st.sampled_from([*CONFIGURED, "nope"]), valid_name, tricky_names, text, long_text)

ints = {
    "y": st.integers(0, 2**8 - 1),
    "n": st.integers(-(2**15), 2**15 - 1),
    "q": st.integers(0, 2**16 - 1),
    "i": st.integers(-(2**31), 2**31 - 1),
    "u": st.integers(0, 2**32 - 1),
    "x": st.integers(-(2**63), 2**63 - 1),
    "t": st.integers(0, 2**64 - 1),
}
leaf_variants = st.one_of(
    text.map(lambda s: Variant("s", s)),
    st.booleans().map(lambda b: Variant("b", b)),
    st.floats().map(lambda f: Variant("d", f)),
    *(s.map(lambda v, sig=sig: Variant(sig, v)) for sig, s in ints.items()),
    st.sampled_from(["/", "/a", "/org/spectrum_os"]).map(lambda p: Variant("o", p)),
    st.sampled_from(["", "s", "a{sv}", "(ii)"]).map(lambda g: Variant("g", g)),
    st.lists(text, max_size=4).map(lambda v: Variant("as", v)),
    st.binary(max_size=32).map(lambda b: Variant("ay", b)),
)
variants = st.recursive(
    leaf_variants,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda v: Variant("av", v)),
        st.dictionaries(text, inner, max_size=3).map(lambda v: Variant("a{sv}", v)),
        inner.map(lambda v: Variant("v", v)),
    ),
    max_leaves=6,
)


def numbers() -> st.SearchStrategy[Variant]:
    return st.one_of(
        st.floats().map(lambda f: Variant("d", f)),
        st.sampled_from([0.0, 1.0, 3600.0, 3600.5, -1.0, math.inf, math.nan]).map(
            lambda f: Variant("d", f)
        ),
        *(s.map(lambda v, sig=sig: Variant(sig, v)) for sig, s in ints.items()),
    )


def create_options() -> st.SearchStrategy[dict[str, Variant]]:
    value = {
        "vmm": st.one_of(
            st.sampled_from(["qemu", "crosvm", "QEMU", "", "kvm"]).map(lambda s: Variant("s", s)),
            variants,
        ),
        "accel": st.one_of(
            st.sampled_from(["tcg", "kvm", "TCG", ""]).map(lambda s: Variant("s", s)), variants
        ),
        "stop_timeout": st.one_of(numbers(), variants),
    }
    known = st.fixed_dictionaries({}, optional=value)
    extra = st.dictionaries(st.one_of(text, st.sampled_from(["vmm ", "VMM"])), variants, max_size=3)
    return st.one_of(known, st.builds(lambda a, b: {**b, **a}, known, extra))


def grant_options() -> st.SearchStrategy[dict[str, Variant]]:
    """Mostly plausible options (so that grants get made and revoked), some wild ones."""
    plausible = st.fixed_dictionaries(
        {},
        optional={
            "access": st.sampled_from(["ro", "rw"]).map(lambda s: Variant("s", s)),
            "lifetime": st.sampled_from(["running", "permanent", "until"]).map(
                lambda s: Variant("s", s)
            ),
            "duration": st.integers(1, 3600).map(lambda v: Variant("u", v)),
        },
    )
    value = {
        "access": st.one_of(
            st.sampled_from(["ro", "rw", "RO", ""]).map(lambda s: Variant("s", s)), variants
        ),
        "lifetime": st.one_of(
            st.sampled_from(["running", "until", "permanent", "forever"]).map(
                lambda s: Variant("s", s)
            ),
            variants,
        ),
        "expires_at": st.one_of(
            st.sampled_from([0, 1, 2**62, 2**64 - 1]).map(lambda v: Variant("t", v)), numbers()
        ),
        "duration": st.one_of(
            st.sampled_from([0, 1, 3600, 10 * 365 * 24 * 3600 + 1]).map(lambda v: Variant("u", v)),
            numbers(),
        ),
    }
    wild = st.fixed_dictionaries({}, optional=value)
    extra = st.dictionaries(text, variants, max_size=2)
    return st.one_of(plausible, plausible, wild, st.builds(lambda a, b: {**b, **a}, wild, extra))


hex4 = st.one_of(
    st.from_regex(r"[0-9a-fA-F]{4}", fullmatch=True), st.text("0123456789abcdefgz:", max_size=6)
)
usb_ids = st.one_of(
    st.sampled_from(["usb:1050:0407", "usb:1d6b:0002", "USB:1050:0407", "usb:", "usb:1050"]),
    st.builds(
        lambda v, p, s: f"usb:{v}:{p}{s}",
        hex4,
        hex4,
        st.one_of(st.just(""), text.map(lambda t: ":" + t)),
    ),
)
resources = st.one_of(
    st.sampled_from(["docs", "/usr/share/doc", "/tmp", "/var"]),
    usb_ids,
    st.sampled_from(["docs", "lan", "nope", "", "/", "/usr/../etc", "/nonexistent"]),
    st.sampled_from(["/usr/share/doc/", "usr", "/etc/passwd", "/proc/self/root", "//usr"]),
    text,
    long_text,
)


# -- oracles ---------------------------------------------------------------------------


def expected_lookup(fz: Fuzz, name: str) -> str | None:
    """The error of a call that first looks an instance up by name (None: found)."""
    if not NAME_RE.fullmatch(name):
        return "InvalidArgument"
    existing = {row[0] for row in fz.run(fz.c.manager("ListInstances"))[0]}
    return None if name in existing else "NoSuchInstance"


def expected_create(
    fz: Fuzz, name: str, app: str, res: list[str], options: dict[str, Variant]
) -> str | None:
    """CreateInstance's outcome: argument checks, then lookups, then the values."""
    known_sigs = {"vmm": {"s"}, "accel": {"s"}, "stop_timeout": {"d", "u", "i", "t", "x"}}
    if (
        not NAME_RE.fullmatch(name)
        or not NAME_RE.fullmatch(app)
        or len(res) > 64
        or not all(NAME_RE.fullmatch(r) for r in res)
        or len(options) > 16
        or any(k not in known_sigs or v.signature not in known_sigs[k] for k, v in options.items())
    ):
        return "InvalidArgument"
    existing = {row[0] for row in fz.run(fz.c.manager("ListInstances"))[0]}
    if name in existing:
        return "Exists"
    if app != "app":
        return "NoSuchApplication"
    if any(r not in ("lan", "docs") for r in res):
        return "NoSuchResource"
    values = {k: v.value for k, v in options.items()}
    if values.get("vmm", "qemu") != "qemu" or values.get("accel", "tcg") not in ("tcg", "kvm"):
        return "InvalidArgument"  # crosvm: no binary on PATH, and it needs kvm
    timeout = values.get("stop_timeout", 0)
    if not 0 <= timeout <= 3600:  # NaN too
        return "InvalidArgument"
    if len(set(res)) != len(res):
        return "InvalidArgument"  # a resource named twice
    return None


def strict_json(path: Path) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- the tests ---------------------------------------------------------------------------


async def test_fuzz_lookups_and_unknown_starts(fuzz: Fuzz) -> None:
    fz = fuzz

    @settings(SETTINGS, max_examples=300)
    @given(
        member=st.sampled_from(
            ["GetInstance", "StartInstance", "StopInstance", "DeleteInstance", "RequestGrant"]
        ),
        name=names,
    )
    def run(member: str, name: str) -> None:
        if member in ("StartInstance", "StopInstance", "RequestGrant") and name in CONFIGURED:
            return  # real starts, stops and requests are fuzzed further down
        expected = expected_lookup(fz, name)
        if member == "RequestGrant":
            result, err = fz.manager(member, "ssa{sv}", name, "docs", {})
        else:
            result, err = fz.manager(member, "s", name)
        if expected is not None:
            assert err is not None and err.short == expected, (member, name, err)
            return
        # The name exists: only configured ones here (created ones are deleted again).
        if member == "GetInstance":
            assert err is None and result == [instance_path(name)]
        elif member == "DeleteInstance":
            assert err is not None and err.short == "InvalidArgument", err
            assert "configuration file" in err.message

    await asyncio.to_thread(run)
    assert (await props(fz.c, "live"))["State"] == "running"


async def test_fuzz_create_and_delete(fuzz: Fuzz) -> None:
    fz = fuzz
    apps = st.one_of(st.sampled_from(["app", "nope", "App", ""]), text)
    res_lists = st.one_of(
        st.lists(st.sampled_from(["lan", "docs", "nope", "Lan", ""]), max_size=4),
        st.lists(st.one_of(valid_name, text), max_size=3),
        st.integers(60, 70).map(lambda n: ["docs"] * n),
    )

    @settings(SETTINGS, max_examples=400)
    @given(
        name=st.one_of(names, st.builds(lambda s: f"fz-{s}", st.text("abc-0", max_size=4))),
        app=apps,
        res=res_lists,
        options=create_options(),
        keep=st.booleans(),
    )
    def run(name: str, app: str, res: list[str], options: dict[str, Variant], keep: bool) -> None:
        expected = expected_create(fz, name, app, res, options)
        result, err = fz.manager("CreateInstance", "ssasa{sv}", name, app, res, options)
        if expected is not None:
            assert err is not None, f"created {name!r} {app!r} {res} {options}"
            assert err.short == expected, (name, app, res, options, err.name, err.message)
            return
        assert err is None, (name, app, res, options, err.name, err.message)
        assert result == [instance_path(name)]
        fz.created.add(name)
        data = strict_json(fz.d.state_dir / "instances.json")
        assert set(data["instances"]) == fz.created
        p = fz.state(name)
        assert (p["State"], p["Application"], p["Resources"]) == ("stopped", "app", res)
        if not keep:
            _, err = fz.manager("DeleteInstance", "s", name)
            assert err is None, err
            fz.created.discard(name)
            assert set(strict_json(fz.d.state_dir / "instances.json")["instances"]) == fz.created

    await asyncio.to_thread(run)
    print(f"created and kept: {sorted(fz.created)}")


async def test_fuzz_grants_and_requests(fuzz: Fuzz) -> None:
    fz = fuzz

    @settings(SETTINGS, max_examples=500)
    @given(
        member=st.sampled_from(["Grant", "RequestGrant"]),
        instance=st.sampled_from(["live", "live", "one"]),
        resource=resources,
        options=grant_options(),
    )
    def run(member: str, instance: str, resource: str, options: dict[str, Variant]) -> None:
        usb = resource.startswith("usb:")
        result, err = fz.manager(member, "ssa{sv}", instance, resource, options, host_dependent=usb)
        if err is not None:
            if not NAME_RE.fullmatch(instance):
                assert err.short == "InvalidArgument", err
            elif instance not in CONFIGURED and instance not in fz.created:
                assert err.short == "NoSuchInstance", err
            return
        assert instance in ("live", "one") or instance in fz.created
        path = result[0]
        if member == "Grant":
            (grants,) = fz.run(fz.c.manager("ListGrants"))
            assert path in [g[5] for g in grants]
            if any(g[5] == path and g[4] == "permanent" for g in grants):
                saved = strict_json(fz.d.state_dir / "grants.json")["grants"]
                assert path.rsplit("/", 1)[1] in [g["id"] for g in saved]
            _, err = fz.call("Grant.Revoke", fz.c.call(path, GRANT_IFACE, "Revoke"))
            assert err is None, err
            (grants,) = fz.run(fz.c.manager("ListGrants"))
            assert path not in [g[5] for g in grants]
        # A request with no agent registered ends at once; the next may follow.

    await asyncio.to_thread(run)
    assert await fz.c.manager("ListGrants") == [[]]
    if (fz.d.state_dir / "grants.json").exists():
        assert strict_json(fz.d.state_dir / "grants.json")["grants"] == []


async def test_fuzz_instance_methods(fuzz: Fuzz) -> None:
    """Random sequences of Instance calls on a real instance; each ends with a Kill."""
    fz = fuzz
    op = st.one_of(
        st.sampled_from(["Start", "Stop", "Kill", "Pause", "Resume"]).map(lambda m: (m, None)),
        st.tuples(
            st.sampled_from(["AttachNetwork", "DetachNetwork"]),
            st.one_of(st.sampled_from(["lan", "docs", "nope", "LAN", ""]), text, long_text),
        ),
    )

    @settings(SETTINGS, max_examples=50)
    @given(ops=st.lists(op, min_size=1, max_size=6))
    def run(ops: list[tuple[str, str | None]]) -> None:
        for member, arg in ops:
            if arg is None:
                fz.instance("one", member)
            else:
                fz.instance("one", member, "s", arg)
        p = fz.state("one")
        if p["State"] not in ("stopped", "failed"):
            _, err = fz.instance("one", "Kill")
            assert err is None, err
        p = fz.state("one")
        assert p["State"] in ("stopped", "failed") and p["MainPID"] == 0, p
        assert "internal" not in p["StateReason"], p

    await asyncio.to_thread(run)

    # Network arguments on the live instance: only named errors, and lan round-trips.
    @settings(SETTINGS, max_examples=80)
    @example(member="DetachNetwork", net="lan")
    @example(member="AttachNetwork", net="lan")
    @given(
        member=st.sampled_from(["AttachNetwork", "DetachNetwork"]),
        net=st.one_of(st.sampled_from(["lan", "docs", "nope", ""]), text, long_text),
    )
    def run_live(member: str, net: str) -> None:
        _, err = fz.instance("live", member, "s", net)
        if not NAME_RE.fullmatch(net) or net == "docs":  # docs: not a network
            assert err is not None and err.short == "InvalidArgument", err
        elif net != "lan":
            assert err is not None and err.short in ("NoSuchResource", "InvalidArgument"), err
        else:
            # lan is in live's configuration. Detaching it may work, or be refused
            # by name (InvalidArgument); "Failed" with QEMU's words is not for this.
            assert err is None or err.short == "InvalidArgument", err

    await asyncio.to_thread(run_live)
    p = await props(fz.c, "live")
    assert p["State"] == "running", p


async def test_daemon_survives_and_restarts(fuzz: Fuzz) -> None:
    """After all of it: the daemon answers, one VMM runs (live), and a restart
    reads back every instance the fuzzing created."""
    fz = fuzz
    print("replies:", dict(sorted(fz.replies.items())))
    print("Failed replies:", fz.failed)
    # Nothing on this host fails: a Failed reply means a refusal that has no name.
    assert fz.failed == []
    assert fz.d.proc is not None and fz.d.proc.returncode is None
    (rows,) = await fz.c.manager("ListInstances")
    listed = {r[0]: r[2] for r in rows}
    assert set(listed) == {*CONFIGURED, *fz.created}
    assert listed["live"] == "running"
    assert all(s in ("stopped", "failed") for n, s in listed.items() if n != "live"), listed

    log = fz.d.stderr_path.read_text(errors="replace")
    internal = [
        line
        for line in log.splitlines()
        if line.startswith(("ERROR spectrumd.bus.errors", "ERROR asyncio", "CRITICAL"))
        or "exception was never retrieved" in line
    ]
    assert internal == [], "\n".join(internal[:10])

    await fz.c.instance_call("live", "Kill")
    marker = os.fsencode(f"{fz.d.state_dir.absolute()}/run/")
    vmms = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                vmms.append(pid)
    assert vmms == [], f"VMMs left after the fuzzing: {vmms}"
    rc = await fz.d.stop()
    assert rc == 0, fz.d.stderr_path.read_text()[-3000:]
    c = await fz.d.start()
    fz.c = c
    (rows,) = await c.manager("ListInstances")
    assert {r[0] for r in rows} == {*CONFIGURED, *fz.created}
