"""The confined backend (``--confine``, jail.py) on a real FUSE mount, and an attacker inside the jail.

The backend serves a host mount through /dev/fuse, confined to a uid no
one uses: what /proc says about it, every kind of request after the
confinement, live export changes over a control listener the daemon
reconnects to. Then a process that enters the very same jail with the
same credentials plays the attacker who took the server over; the same
script run with only the uid dropped shows that each thing it tries is
refused by the jail, not by file permissions. Needs root and /dev/fuse.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spectrumd.virtiofs import jail, resolve
from spectrumd.virtiofs.control import send_command
from tests.conftest import proc_state, readable_tmpdir

from .test_fuse_mount import ROOT, Mounted
from .vmharness import unused_ids

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="root+fuse"),
]


UID, OTHER_UID = unused_ids(2)


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def assert_jailed(pid: int) -> None:
    """*pid* runs as UID alone, with no capability, the seccomp filter, an empty root."""
    st = status(pid)
    assert st["Uid"].split() == [str(UID)] * 4
    assert st["Gid"].split() == [str(UID)] * 4
    assert st["Groups"] == ""
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert st["CapPrm"] == st["CapEff"] == st["CapAmb"] == "0000000000000000"
    assert os.listdir(f"/proc/{pid}/root") == []


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[Mounted]:
    m = Mounted(tmp_path, confine=(UID, UID), control="listen")
    os.chown(tmp_path / "rw", UID, UID)
    try:
        yield m
    finally:
        m.close()
    log = m.log.read_text()
    assert m.proc.returncode == 0, log
    # A module imported late would fail here (no file system); so would any request.
    assert "Traceback" not in log and "ERROR" not in log, log


def test_the_confined_backend_has_its_uid_no_groups_no_root_no_network(confined: Mounted) -> None:
    assert sorted(os.listdir(confined.mnt)) == ["ro", "rw"]  # answered, so confined by now
    pid = confined.proc.pid
    assert_jailed(pid)
    # Beyond stdin, stdout and stderr: /dev/fuse, sockets, the exports (each the
    # root of a detached mount, so its path is "/") and its own /proc/PID/fd.
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
             if int(fd) > 2}  # fmt: skip
    assert {x for x in links if not x.startswith("socket:")} == {"/dev/fuse", "/", f"/{pid}/fd"}
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    assert len(mounts) == 1 and " / / ro," in mounts[0] and " - tmpfs " in mounts[0], mounts
    devices = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [d.split(":")[0].strip() for d in devices] == ["lo"]
    limits = {line[:26].strip(): line[26:].split() for line in
              Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]}  # fmt: skip
    assert limits["Max core file size"][:2] == ["0", "0"]
    assert limits["Max processes"][:2] == ["1", "1"]


def test_every_kind_of_request_works_after_confinement(confined: Mounted) -> None:
    m, rw = confined.mnt / "rw", confined.base / "rw"
    (m / "f").write_text("hello\n")  # LOOKUP, CREATE, WRITE, RELEASE
    assert (m / "f").read_text() == "hello\n"  # OPEN, READ
    with open(m / "f", "a") as f:  # O_APPEND, and FSYNC
        f.write("more\n")
        f.flush()
        os.fsync(f.fileno())
    os.mkdir(m / "d")  # MKDIR
    os.rename(m / "f", m / "d" / "g")  # RENAME
    assert os.listdir(m / "d") == ["g"]  # OPENDIR, READDIR
    dfd = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # FSYNCDIR
    finally:
        os.close(dfd)
    (m / "h").write_text("h")
    libc = ctypes.CDLL(None, use_errno=True)
    # RENAME2: the kernel sends it for flags only (here RENAME_EXCHANGE, 2).
    assert libc.renameat2(-100, bytes(m / "h"), -100, bytes(m / "d" / "g"), 2) == 0
    assert (rw / "d" / "g").read_text() == "h" and (rw / "h").read_text() == "hello\nmore\n"
    os.chmod(m / "h", 0o600)  # SETATTR mode
    os.truncate(m / "h", 3)  # SETATTR size, no handle: reopened through /proc/self/fd
    with open(m / "d" / "g", "r+") as f:
        os.ftruncate(f.fileno(), 0)  # SETATTR size with a handle
    os.utime(m / "h", ns=(1_000_000_000, 2_000_000_000))  # SETATTR times
    os.utime(m / "d" / "g")  # SETATTR times, now
    st = (rw / "h").stat()
    assert (st.st_mode & 0o777, st.st_size, st.st_mtime_ns, st.st_uid) == (0o600, 3, 2 * 10**9, UID)
    assert (m / "h").stat().st_size == 3 and (rw / "d" / "g").stat().st_size == 0  # GETATTR
    assert os.statvfs(confined.mnt).f_namemax == 255 and os.statvfs(m).f_bsize > 0  # STATFS
    assert os.readlink(m / "escape") == str(confined.base / "outside")  # READLINK
    with pytest.raises(PermissionError):
        os.chmod(m / "h", 0o4755)  # no setuid bit
    with pytest.raises(OSError) as e:
        (confined.mnt / "ro" / "new").write_text("x")
    assert e.value.errno == errno.EROFS
    assert (confined.mnt / "ro" / "file").read_text() == "read only\n"
    os.unlink(m / "h")  # UNLINK
    os.unlink(m / "d" / "g")
    os.rmdir(m / "d")  # RMDIR
    assert sorted(os.listdir(rw)) == ["escape"]


def test_live_exports_over_the_control_listener_after_confinement(confined: Mounted) -> None:
    base, m = confined.base, confined.mnt
    assert os.listdir(m / "rw") == ["escape"]  # confined by now
    (base / "late").mkdir()
    (base / "late" / "f").write_text("late\n")
    plain = os.open(base / "late", os.O_PATH | os.O_DIRECTORY)
    detached = jail.detach(plain, False)
    writable = jail.detach(plain, True)
    try:
        with confined.connect() as first:
            reply = send_command(first, {"op": "add_export", "name": "late"}, (plain,))
            assert reply["ok"] is False and "'..' leads out" in reply["error"]
            reply = send_command(first, {"op": "add_export", "name": "late"}, (writable,))
            assert reply["ok"] is False and "its mount is writable" in reply["error"]
            reply = send_command(first, {"op": "add_export", "name": "late"}, (detached,))
            assert reply == {"ok": True}
        assert (m / "late" / "f").read_text() == "late\n"
        with pytest.raises(OSError) as e:  # read-only at the mount too
            (m / "late" / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        # The first connection is closed (a daemon that restarted); a second one connects.
        second = confined.connect()
        assert send_command(second, {"op": "list_exports"})["exports"] == ["late", "ro", "rw"]
        third = confined.connect()  # replaces the second at once
        assert second.recv(1) == b""
        second.close()
        assert send_command(third, {"op": "remove_export", "name": "late"})["ok"] is True
        assert sorted(os.listdir(m)) == ["ro", "rw"]
        third.close()
    finally:
        for fd in (plain, detached, writable):
            os.close(fd)
    assert (m / "rw" / "escape").is_symlink()  # the guest side never stopped


# The attacker: argv[1] is its configuration; it prints what each attempt gave
# ("ok" or the errno's name) as one JSON line, then tries to exec.
ATTACKER = r"""
import ctypes, errno, json, os, signal, socket, sys
from spectrumd.virtiofs import jail, resolve
from spectrumd.virtiofs.spin import RunDelay

cfg = json.loads(sys.argv[1])
uid, mine = cfg["uid"], cfg["mine"]
if cfg["jail"]:
    jail.enter(uid, uid)
else:  # the control run: the same uid, no jail
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
libc = ctypes.CDLL(None, use_errno=True)
out = {}


def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))


def c(rc):
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read(path, **kw):
    os.close(os.open(path, os.O_RDONLY, **kw))


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        s.connect(cfg["socket"])


def run_delay():
    waits = RunDelay()  # as the backend's loop opens it, once confined
    if waits.fd < 0:
        raise OSError(errno.ENOENT, "no /proc/self/schedstat")
    waits.since_last()
    waits.close()


def reopen_to_read():
    fd = os.open("new", os.O_WRONLY, dir_fd=mine)  # its own, made just before
    try:
        twin = resolve.reopen(fd, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.pread(twin, 5, 0)
        finally:
            os.close(twin)
    finally:
        os.close(fd)


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


attempt("read /etc/passwd", lambda: read("/etc/passwd"))
attempt("read another instance's file", lambda: read(cfg["other"]))
attempt("append to the victim", lambda: open(cfg["victim"], "a").write("pwned"))
attempt("read through the inherited fd", lambda: read("file", dir_fd=mine))
attempt("create through the inherited fd",
        lambda: os.close(os.open("new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=mine)))
attempt("reopen a write-only file to read it", reopen_to_read)
attempt("climb out of the inherited fd", lambda: read("../victim", dir_fd=mine))
attempt("reach the host's /proc from the kept one",
        lambda: read("../../1/status", dir_fd=resolve.proc_fd()))
attempt("connect to a unix socket in /tmp", connect)
attempt("kill another uid's process", lambda: os.kill(cfg["sleeper"], signal.SIGKILL))
attempt("create a socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("fork", fork)
attempt("read its own wait for a CPU", run_delay)
attempt("ptrace another process", lambda: c(libc.ptrace(16, cfg["sleeper"], None, None)))
attempt("mount", lambda: c(libc.mount(b"none", b"/", b"tmpfs", 0, None)))
attempt("become root", lambda: os.setuid(0))
attempt("unshare a user namespace", lambda: c(libc.unshare(0x10000000)))
print(json.dumps(out), flush=True)
try:
    os.execv("/bin/true", ["true"])
except OSError as e:
    print(json.dumps({"exec": errno.errorcode[e.errno]}), flush=True)
"""


def run_attacker(cfg: dict[str, object], mine: int) -> tuple[dict[str, str], list[str]]:
    r = subprocess.run(
        [sys.executable, "-c", ATTACKER, json.dumps({**cfg, "mine": mine})],
        cwd="/", pass_fds=(mine,), env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    return json.loads(lines[0]), lines[1:]


@pytest.fixture
def world() -> Iterator[Path]:
    """Another instance's directory, a victim file and a unix socket, all open to any uid."""
    with readable_tmpdir("jail.") as d:
        yield d


def test_an_attacker_in_the_jail_reaches_nothing_outside(world: Path) -> None:
    (world / "other").mkdir(mode=0o755)
    (world / "other" / "file").write_text("another instance's\n")
    (world / "other" / "file").chmod(0o644)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(world / "sock"))
    listener.listen()
    (world / "sock").chmod(0o777)
    sleeper = subprocess.Popen(["sleep", "60"], user=OTHER_UID, group=OTHER_UID, extra_groups=[])
    try:
        results = {}
        for run in ("jail", "control"):
            here = world / run
            (here / "mine").mkdir(parents=True)
            here.chmod(0o755)
            (here / "mine" / "file").write_text("mine\n")
            os.chown(here / "mine", UID, UID)
            (here / "victim").write_text("untouched\n")
            (here / "victim").chmod(0o666)
            cfg = {"uid": UID, "jail": run == "jail", "other": str(world / "other" / "file"),
                   "victim": str(here / "victim"), "socket": str(world / "sock"),
                   "sleeper": sleeper.pid}  # fmt: skip
            plain = os.open(here / "mine", os.O_PATH | os.O_DIRECTORY)
            try:
                mine = jail.detach(plain, True)  # as the backend's exports are
            finally:
                os.close(plain)
            try:
                results[run] = run_attacker(cfg, mine)
            finally:
                os.close(mine)
        got, after = results["jail"]
        assert got == {
            "read /etc/passwd": "ENOENT",
            "read another instance's file": "ENOENT",
            "append to the victim": "ENOENT",
            "read through the inherited fd": "ok",  # the point of the fd
            "create through the inherited fd": "ok",
            # what warming reads a write-only handle's file with (warm.py, Tree.read_fd)
            "reopen a write-only file to read it": "ok",
            "climb out of the inherited fd": "ENOENT",  # '..' of a detached mount is itself
            "reach the host's /proc from the kept one": "ENOENT",
            "connect to a unix socket in /tmp": "EPERM",
            "kill another uid's process": "EPERM",
            "create a socket": "EPERM",
            "fork": "EPERM",
            "ptrace another process": "EPERM",
            "mount": "EPERM",
            "become root": "EPERM",
            "unshare a user namespace": "EPERM",
            "read its own wait for a CPU": "ok",  # what polling backs off on (spin.py)
        }
        assert after == ['{"exec": "EPERM"}']
        # Without the jail, the same uid gets through wherever permissions alone allow it.
        control, after = results["control"]
        for name in ("read /etc/passwd", "read another instance's file", "append to the victim",
                     "connect to a unix socket in /tmp", "create a socket", "fork",
                     "reach the host's /proc from the kept one"):  # fmt: skip
            assert control[name] == "ok", (name, control)
        assert after == []  # it became /bin/true
        assert (world / "jail" / "victim").read_text() == "untouched\n"
        assert (world / "control" / "victim").read_text() == "untouched\npwned"
        assert (world / "jail" / "mine" / "new").stat().st_uid == UID
        assert sleeper.poll() is None  # still alive
    finally:
        listener.close()
        sleeper.kill()
        sleeper.wait()


def test_a_detached_export_has_no_way_up(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "beside").write_text("beside\n")
    plain = os.open(tmp_path / "export", os.O_PATH | os.O_DIRECTORY)
    try:
        assert not resolve.no_way_up(plain)
        os.close(os.open("../beside", os.O_RDONLY, dir_fd=plain))  # a plain fd leads up
        for writable in (False, True):
            fd = jail.detach(plain, writable)
            try:
                assert resolve.no_way_up(fd)
                with pytest.raises(FileNotFoundError):
                    os.open("../beside", os.O_RDONLY, dir_fd=fd)
                with pytest.raises(FileNotFoundError):
                    os.open("../../../../beside", os.O_RDONLY, dir_fd=fd)
                ro = bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
                assert ro is not writable
                if not writable:  # refused by the mount, even to root
                    with pytest.raises(OSError) as e:
                        os.open("new", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
                    assert e.value.errno == errno.EROFS
            finally:
                os.close(fd)
    finally:
        os.close(plain)


def test_the_polling_companion_is_confined_as_its_server_and_ends_with_it(tmp_path: Path) -> None:
    """The vhost-user backend forks its companion (spin.KeepAwake) before the
    jail; the companion enters the same jail and keeps nothing but its pipe."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "vhost.sock"))
    listener.listen(1)
    log = (tmp_path / "log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrumd.virtiofs", "--vhost-listen-fd", str(listener.fileno()),
         "--confine", f"{UID}:{UID}"],
        cwd=ROOT, pass_fds=(listener.fileno(),), env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=log, stderr=log,
    )  # fmt: skip
    listener.close()
    companion = 0
    try:

        def confined() -> bool:
            nonlocal companion
            kids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            if len(kids) == 1:
                companion = int(kids[0])
            return (
                companion > 0
                and status(server.pid).get("Seccomp") == "2"
                and os.listdir(f"/proc/{companion}/fd") == ["0"]
            )

        end = time.monotonic() + 30
        while not confined():
            assert server.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < end, (tmp_path / "log").read_text()
            time.sleep(0.02)
        assert_jailed(companion)
        assert os.readlink(f"/proc/{companion}/fd/0").startswith("pipe:")
        for ns in ("mnt", "net", "ipc"):  # namespaces of its own, not the host's nor the server's
            mine = os.readlink(f"/proc/{companion}/ns/{ns}")
            assert mine not in (os.readlink(f"/proc/self/ns/{ns}"),
                                os.readlink(f"/proc/{server.pid}/ns/{ns}")), ns  # fmt: skip
        devices = Path(f"/proc/{companion}/net/dev").read_text().splitlines()[2:]
        assert [d.split(":")[0].strip() for d in devices] == ["lo"]
        assert os.sched_getscheduler(companion) == os.SCHED_OTHER  # asleep: no request yet
        server.terminate()
        assert server.wait(10) == 0
        end = time.monotonic() + 3
        while proc_state(companion) not in ("", "Z"):
            assert time.monotonic() < end, "the companion outlived its server"
            time.sleep(0.01)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "log").read_text()


@pytest.mark.parametrize("privileged", [True, False], ids=["uid-0", "no-CAP_SYS_ADMIN"])
def test_a_confinement_that_fails_exits_before_serving(privileged: bool) -> None:
    if not privileged and shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "spectrumd.virtiofs", "--vhost-fd", str(theirs.fileno())]
    if privileged:
        argv += ["--confine", "0:0"]
    else:  # root still, but without the capability the namespaces need
        argv = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--", *argv,
                "--confine", f"{UID}:{UID}"]  # fmt: skip
    try:
        r = subprocess.run(
            argv, cwd=ROOT, pass_fds=(theirs.fileno(),), env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        theirs.close()
        assert r.returncode == 1, r.stderr
        if privileged:
            assert "cannot confine: uid 0 gid 0: neither may be 0 (root)" in r.stderr
        else:  # the step that failed is named
            assert (
                "cannot confine: unshare(CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC): "
                "Operation not permitted"
            ) in r.stderr
        ours.settimeout(5)
        assert ours.recv(1) == b""  # it never answered the VMM
    finally:
        ours.close()
        theirs.close()


def test_the_two_vhost_sources_exclude_each_other() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "spectrumd.virtiofs", "--vhost-fd", "0", "--vhost-listen-fd", "0"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
