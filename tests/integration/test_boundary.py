"""The boundary between instances, and between a VMM and root.

The attackers here are instance A's VMM and A's file server as the kernel
knows them: their uids, gids and groups, inside their namespaces (network;
for the file server its empty mount namespace too). They try to read or
write B's VMM's and file server's memory and environment, signal B's VMM,
the file servers and a process of root's, connect to every socket of the
state directory, write or plant links anywhere in the state directory, and
(the file server) read B's exports and host files. Then the daemon is
SIGKILLed and restarted, and both instances are stopped: every attempt
failed, and the victim directory, file and process outside are untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.host.uids import DEFAULT_RANGE
from tests.conftest import Daemon
from tests.integration.helpers import app_config, file_servers, marked_dir, props, vmms, wait_for
from tests.integration.test_restart import kill_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ATTACKER = r"""
import ctypes, json, os, signal, socket, sys
targets = json.loads(sys.argv[1])
reached = []
enter = targets.get("enter")
if enter:
    # Into a confined process's namespaces (as root), then its ids for good.
    libc = ctypes.CDLL(None, use_errno=True)
    for fd, kind in enter["ns"]:
        if libc.setns(fd, kind) != 0:
            raise OSError(ctypes.get_errno(), f"setns {kind:#x}")
    os.setgroups(enter["groups"])
    os.setresgid(enter["gid"], enter["gid"], enter["gid"])
    os.setresuid(enter["uid"], enter["uid"], enter["uid"])

def attempt(what, fn):
    try:
        fn()
    except OSError:
        return
    reached.append(what)

for victim in targets["victims"]:
    for name in ("mem", "environ", "maps", "cmdline_write"):
        path = f"/proc/{victim}/{name.replace('_write', '')}"
        mode = "r+b" if name in ("mem", "cmdline_write") else "rb"
        attempt(f"open {path} {mode}", lambda: open(path, mode).read(1))
for path in targets.get("read", []):
    attempt(f"read {path}", lambda: os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1))
for pid in targets["signal"]:
    attempt(f"signal {pid}", lambda: os.kill(pid, 0))
for path in targets["sockets"]:
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        finally:
            s.close()
    attempt(f"connect {path}", connect)
for d in targets["dirs"]:
    attempt(f"create in {d}", lambda: open(os.path.join(d, "planted"), "x").close())
    attempt(f"symlink in {d}", lambda: os.symlink(targets["victim_dir"], os.path.join(d, "state.json.tmp")))
for f in targets["files"]:
    attempt(f"write {f}", lambda: open(f, "r+b").close())
print(json.dumps({"reached": reached, "uid": os.getuid(), "gid": os.getgid()}))
"""


def credentials(pid: int) -> tuple[int, int, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    return int(field["Uid"][0]), int(field["Gid"][0]), [int(g) for g in field["Groups"]]


def status_field(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in /proc/{pid}/status")


CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000


def attack(
    targets: dict[str, object], pid: int, kinds: list[int], uid: int, gid: int, groups: list[int]
) -> dict[str, object]:
    """Run ATTACKER inside ``pid``'s namespaces of ``kinds``, as uid/gid/groups."""
    fds = [os.open(f"/proc/{pid}/ns/{'net' if k == CLONE_NEWNET else 'mnt'}", os.O_RDONLY)
           for k in kinds]  # fmt: skip
    enter = {"ns": list(zip(fds, kinds, strict=True)), "uid": uid, "gid": gid, "groups": groups}
    try:
        out = subprocess.run(
            ["/usr/bin/python3", "-c", ATTACKER, json.dumps({**targets, "enter": enter})],
            pass_fds=fds,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.fixture
def victim() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    with marked_dir("victim.", "victim-ok") as d:
        proc = subprocess.Popen(["sleep", "600"])
        try:
            yield d, proc
        finally:
            proc.kill()
            proc.wait()


async def test_a_hostile_vmm_reaches_nothing_outside(
    daemon: Daemon, victim: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    victim_dir, victim_proc = victim
    with marked_dir("docs.", "docs-ok") as docs, marked_dir("secret.", "b-only") as secret:
        cfg = app_config(
            "sleep 3600",
            a={"application": "app", "resources": ["docs"]},
            b={"application": "app", "resources": ["docs", "secret"]},
        )
        cfg["resources"]["docs"]["path"] = str(docs)
        cfg["resources"]["secret"] = {"type": "directory", "path": str(secret)}
        c = await daemon.start(cfg)
        for n in "ab":
            await c.manager("StartInstance", "s", n)
        for n in "ab":
            await wait_for(c, n, lambda p: p["GuestReady"], timeout=90)
        pids = vmms(daemon.state_dir)
        assert set(pids) == {"a", "b"}

        # One uid each, never root, from the range; confined.
        uid_a, gid_a, groups_a = credentials(pids["a"])
        uid_b, _, _ = credentials(pids["b"])
        assert uid_a != uid_b and 0 not in (uid_a, uid_b)
        assert uid_a in DEFAULT_RANGE and uid_b in DEFAULT_RANGE and gid_a == uid_a
        assert groups_a == []
        for n in "ab":
            assert status_field(pids[n], "Seccomp") == "2"
            assert status_field(pids[n], "NoNewPrivs") == "1"
            # An empty network namespace: loopback only (its taps are descriptors).
            assert os.readlink(f"/proc/{pids[n]}/ns/net") != os.readlink("/proc/self/ns/net")
            devs = Path(f"/proc/{pids[n]}/net/dev").read_text().splitlines()[2:]
            assert [d.split(":")[0].strip() for d in devs] == ["lo"]

        # One file server each, as a uid of its own (neither VMM's), confined:
        # seccomp, no network, and a mount namespace with nothing in it.
        servers = file_servers(daemon.state_dir)
        assert set(servers) == {"a", "b"}
        fs_uids = {n: credentials(servers[n])[0] for n in "ab"}
        assert len({uid_a, uid_b, *fs_uids.values()}) == 4
        assert all(u in DEFAULT_RANGE for u in fs_uids.values())
        for n in "ab":
            assert credentials(servers[n])[1:] == (fs_uids[n], [])
            assert status_field(servers[n], "Seccomp") == "2"
            assert status_field(servers[n], "NoNewPrivs") == "1"
            assert os.listdir(f"/proc/{servers[n]}/root") == []
            devs = Path(f"/proc/{servers[n]}/net/dev").read_text().splitlines()[2:]
            assert [d.split(":")[0].strip() for d in devs] == ["lo"]

        run = daemon.state_dir / "run"
        dirs = [str(p) for p in [daemon.state_dir, *daemon.state_dir.rglob("*")] if p.is_dir()]
        files = [str(p) for p in daemon.state_dir.rglob("*") if p.is_file()]
        sockets = [str(p) for p in run.rglob("*.sock")]
        assert len(sockets) >= 8  # QMP, console, control, fs, portal: for each
        targets = {
            "victims": [pids["b"], servers["b"]],
            "signal": [pids["b"], victim_proc.pid, *servers.values()],
            "sockets": sockets,
            "dirs": dirs,
            "files": files,
            "victim_dir": str(victim_dir),
        }
        # As A's VMM: its ids in its network namespace.
        uid, gid, groups = credentials(pids["a"])
        result = attack(targets, pids["a"], [CLONE_NEWNET], uid, gid, groups)
        assert (result["uid"], result["gid"]) == (uid_a, gid_a)
        assert result["reached"] == []
        # As A's file server: its ids in its network and (empty) mount namespace.
        # B's exports and any host path are out of its reach (it holds its own
        # exports as descriptors, which this attacker does not have).
        uid, gid, groups = credentials(servers["a"])
        fs_targets = {**targets, "read": [str(secret), str(secret / "marker"), "/etc/passwd"]}
        fs_targets["victims"] = [*targets["victims"], pids["a"]]
        # (Every process but itself: A's file server is the attacker here.)
        fs_targets["signal"] = [pids["b"], victim_proc.pid, servers["b"], pids["a"]]
        result = attack(fs_targets, servers["a"], [CLONE_NEWNET, CLONE_NEWNS], uid, gid, groups)
        assert (result["uid"], result["gid"]) == (fs_uids["a"], fs_uids["a"])
        assert result["reached"] == []

        # The daemon dies and comes back; both instances stop as asked.
        await kill_daemon(daemon)
        c = await daemon.start()
        for n in "ab":
            assert (await props(c, n))["State"] == "running"
            await c.manager("StopInstance", "s", n)
            assert (await props(c, n))["State"] == "stopped"
        assert vmms(daemon.state_dir) == {}
        assert (victim_dir / "marker").read_text() == "victim-ok\n"
        assert sorted(p.name for p in victim_dir.iterdir()) == ["marker"]
        assert victim_proc.poll() is None
        assert not list(daemon.state_dir.rglob("planted"))


async def test_a_forged_record_moves_nothing(
    daemon: Daemon, victim: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """Even a record root did not write (here: written as root, by the test) names
    nothing the daemon acts on: its paths are the daemon's own, and its pid is
    adopted only with the run's token in the process's environment."""
    victim_dir, victim_proc = victim
    c = await daemon.start(app_config("sleep 3600"))
    await c.manager("StartInstance", "s", "one")
    real = (await props(c, "one"))["MainPID"]
    await kill_daemon(daemon)
    record_path = daemon.state_dir / "run" / "one" / "state.json"
    record = json.loads(record_path.read_text())
    stat = Path(f"/proc/{victim_proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    record.update(
        pid=victim_proc.pid,
        start_time=int(stat[19]),  # the victim's own: the start-time check passes
        exe=os.readlink(f"/proc/{victim_proc.pid}/exe"),
        token="forged",
    )
    record["spec"]["run_dir"] = str(victim_dir)
    record_path.write_text(json.dumps(record))
    try:
        c = await daemon.start()
        p = await props(c, "one")
        assert (p["State"], p["StateReason"]) == (
            "failed",
            "exited while spectrumd was not running",
        )
        assert victim_proc.poll() is None
        assert (victim_dir / "marker").read_text() == "victim-ok\n"
    finally:
        os.kill(real, signal.SIGKILL)
    assert not (daemon.state_dir / "run" / "one").exists()
