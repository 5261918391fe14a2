"""Directory resources as a guest sees them: each instance's own virtio-fs backend.

Two boots. The first goes through the real daemon over D-Bus: file
operations, a read-only export, files that belong to the instance's
file-server uid, and the backend killed under a running guest (the VM is
ended and the instance is failed, naming the file server). The second drives
a Supervisor and a FileService in this process to add and remove an export
while the guest watches.

Host directories must be readable by the file server's uid (an "other" to
every host user), so the trees made here are 0755/0644, and 0777 where the
guest writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

from spectrumd.errors import Failed
from spectrumd.supervisor import Environment, Supervisor
from spectrumd.supervisor.files import Export, FileService
from spectrumd.supervisor.instance import Instance
from tests.conftest import Daemon, kill_leftover_vmms
from tests.integration.helpers import (
    app_config,
    error_of,
    file_servers,
    props,
    short,
    vmms,
    wait_for,
    wait_log,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def trees() -> Iterator[Path]:
    """``docs`` (read-only export) and ``work`` (writable) under a 0755 base."""
    base = Path(tempfile.mkdtemp(prefix="spfs.", dir="/tmp"))
    try:
        base.chmod(0o755)
        docs, work = base / "docs", base / "work"
        docs.mkdir(mode=0o755)
        work.mkdir()
        work.chmod(0o777)
        (docs / "hello.txt").write_text("hello from the host\n")
        (docs / "hello.txt").chmod(0o644)
        (work / "doomed.txt").write_text("to be removed\n")
        (work / "doomed.txt").chmod(0o666)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def dir_resources(base: Path, **writable: bool) -> dict[str, dict[str, object]]:
    return {
        name: {"type": "directory", "path": str(base / name), "writable": w}
        for name, w in writable.items()
    }


async def wait_after(path: Path, offset: int, pattern: str, timeout: float = 30) -> str:
    """The first console line after byte ``offset`` that matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""
        for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines only
            if re.search(pattern, line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no line matching {pattern!r} within {timeout} s:\n{text[-2000:]}"
            )
        await asyncio.sleep(0.1)


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


# The first boot's application: each step prints one line for the test, then
# the guest reads a host file every 0.2 s, forever.
OPERATIONS = r"""
cd /mnt/spectrum || { echo "STEP cd failed"; exit 9; }
step() { echo "STEP $*"; }
step "root: $(ls | tr '\n' ' ')"
step "read: $(cat docs/hello.txt)"
echo "guest wrote this" >work/new.txt && step "write ok"
mkdir work/sub && step "mkdir ok"
mv work/new.txt work/sub/moved.txt && step "rename ok"
rm work/doomed.txt && step "unlink ok"
step "ls-l: $(ls -l work/sub | grep moved)"
step "readback: $(cat work/sub/moved.txt)"
{ echo x >docs/new.txt; } 2>/tmp/e; step "ro-create: $(cat /tmp/e)"
mkdir docs/d 2>/tmp/e; step "ro-mkdir: $(cat /tmp/e)"
rm docs/hello.txt 2>/tmp/e; step "ro-unlink: $(cat /tmp/e)"
step "ro-intact: $(cat docs/hello.txt)"
i=0
while :; do
  if c=$(cat /mnt/spectrum/docs/hello.txt 2>&1); then echo "rd-ok $i"; else echo "rd-fail $i $c"; fi
  i=$((i + 1))
  sleep 0.2
done
"""


async def test_guest_file_operations_and_server_restart(daemon: Daemon, trees: Path) -> None:
    cfg = app_config(OPERATIONS, fs={"application": "app", "resources": ["docs", "work"]})
    cfg["resources"] = dir_resources(trees, docs=False, work=True)
    c = await daemon.start(cfg)
    await c.manager("StartInstance", "s", "fs")
    log = Path((await props(c, "fs"))["ConsoleLog"])
    content = await wait_log(log, "STEP ro-intact", timeout=90)
    steps: dict[str, str] = {}
    for line in content.splitlines():
        if line.startswith("STEP "):
            key, _, value = line.removeprefix("STEP ").partition(": ")
            steps[key] = value

    assert steps["root"].split() == ["docs", "work"], content
    assert steps["read"] == "hello from the host"
    for op in ("write ok", "mkdir ok", "rename ok", "unlink ok"):
        assert op in steps, f"{op!r} missing:\n{content}"
    assert re.fullmatch(r"-rw-r--r--\s+1\s+\d+\s+\d+\s+17 .* moved\.txt", steps["ls-l"]), steps
    assert steps["readback"] == "guest wrote this"
    for op in ("ro-create", "ro-mkdir", "ro-unlink"):
        assert steps[op].endswith("Read-only file system"), (op, steps[op])
    assert steps["ro-intact"] == "hello from the host"

    # What the host sees.
    work = trees / "work"
    assert (work / "sub" / "moved.txt").read_text() == "guest wrote this\n"
    assert not (work / "new.txt").exists() and not (work / "doomed.txt").exists()
    assert sorted(os.listdir(trees / "docs")) == ["hello.txt"]
    # Its own backend, as its own uid (not the VMM's), made the files.
    state_dir = daemon.state_dir
    (vmm,) = vmms(state_dir).values()
    (server,) = file_servers(state_dir).values()
    assert uid_of(server) not in (0, uid_of(vmm)), (uid_of(server), uid_of(vmm))
    assert (work / "sub" / "moved.txt").stat().st_uid == uid_of(server)
    argv = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--poll-max-us") + 1] == b"1000"  # --file-server-poll's default

    # Kill the backend under the running guest: the guest could never reach
    # its files again (a virtio-fs device cannot reconnect), so the VM ends
    # and the instance is failed, saying why; the daemon answers throughout.
    await wait_log(log, "rd-ok 2")
    os.kill(server, signal.SIGKILL)
    p = await wait_for(c, "fs", lambda p: p["State"] == "failed", timeout=15)
    assert "file server" in p["StateReason"] and "SIGKILL" in p["StateReason"], p
    assert vmms(state_dir) == {} and file_servers(state_dir) == {}
    assert not (state_dir / "run" / "fs").exists()

    # Started again, it has its files again.
    mark = log.stat().st_size
    await c.manager("StartInstance", "s", "fs")
    await wait_after(log, mark, r"^rd-ok ", timeout=90)
    await c.manager("StopInstance", "s", "fs")
    p = await props(c, "fs")
    assert p["State"] == "stopped", p
    assert file_servers(state_dir) == {}


# The second boot's application: print the mount's entries and try a file
# in "extra", by path and from a shell whose working directory is in it.
WATCHER = r"""
i=0
while :; do
  echo "ls $i: $(ls /mnt/spectrum | tr '\n' ' ')"
  if c=$(cat /mnt/spectrum/extra/f 2>&1); then echo "path-ok $i $c"; else echo "path-fail $i $c"; fi
  if [ ! -e /tmp/held ] && [ -d /mnt/spectrum/extra ]; then
    : >/tmp/held
    (
      cd /mnt/spectrum/extra || exit
      while :; do
        if c=$(cat f 2>&1); then echo "held-ok $c"; else echo "held-fail $c"; fi
        sleep 0.3
      done
    ) &
    (
      # Attributes the guest holds: is f still there, seen from inside? And
      # has the host said the revocation is done (a marker in docs)?
      cd /mnt/spectrum/extra || exit
      while :; do
        if [ -e /mnt/spectrum/docs/revoked ]; then s=after; else s=before; fi
        if [ -e f ]; then echo "attr-ok $s"; else echo "attr-fail $s"; fi
        sleep 0.02
      done
    ) &
  fi
  i=$((i + 1))
  sleep 0.3
done
"""


@attrs.frozen
class InProcess:
    """A Supervisor and its FileService in this process, with instance ``live``."""

    state: Path
    files: FileService
    env: Environment
    inst: Instance


@contextlib.asynccontextmanager
async def in_process(
    guest_dir: Path, short_tmp: Path, trees: Path, command: str, control_timeout: float = 10.0
) -> AsyncIterator[InProcess]:
    """Instance ``live`` running *command* with ``docs`` (read-only); everything
    it made is gone afterwards, whatever the test did."""
    state = Path(tempfile.mkdtemp(prefix="f.", dir=short_tmp))
    cfg = app_config(command, live={"application": "app", "resources": ["docs"]})
    cfg["resources"] = dir_resources(trees, docs=False)
    (state / "config.json").write_text(json.dumps(cfg))
    files = FileService(state, control_timeout=control_timeout)
    env = Environment(state_dir=state, guest_dir=guest_dir, drivers=(files,))
    sup = Supervisor(state / "config.json", env)
    inst = sup.get("live")
    try:
        yield InProcess(state, files, env, inst)
    finally:
        with contextlib.suppress(Exception):
            if inst.active:
                await inst.kill()
        await sup.close()
        kill_leftover_vmms(state)
        shutil.rmtree(state, ignore_errors=True)


async def test_exports_added_and_removed_while_running(
    guest_dir: Path, short_tmp: Path, trees: Path
) -> None:
    extra = trees / "extra"
    extra.mkdir(mode=0o755)
    (extra / "f").write_text("extra-content\n")
    (extra / "f").chmod(0o644)
    docs_only = {"docs": Export(str(trees / "docs"))}
    async with in_process(guest_dir, short_tmp, trees, WATCHER) as p:
        files, inst, log = p.files, p.inst, p.env.log_path("live")
        await inst.start()
        line = await wait_after(log, 0, r"^ls \d+: ", timeout=90)
        assert line.split(": ", 1)[1].split() == ["docs"], line
        line = await wait_after(log, 0, r"^path-fail 0 ", timeout=10)
        assert "No such file or directory" in line, line

        # Added: it appears in the listing and can be read, at once.
        mark = log.stat().st_size
        await files.set_exports("live", {**docs_only, "extra": Export(str(extra))})
        line = await wait_after(log, mark, r"^ls \d+: \S+ \S+", timeout=10)
        assert line.split(": ", 1)[1].split() == ["docs", "extra"], line
        assert (await wait_after(log, mark, r"^path-ok ")).endswith("extra-content")
        assert (await wait_after(log, mark, r"^held-ok ")) == "held-ok extra-content"

        # Removed: gone from the listing, not readable by path, and the shell
        # that sits inside it gets I/O errors; and it stays so. Once
        # set_exports returns, not even the attributes the guest held of it
        # are shown (the backend's settle time has passed): the marker made
        # then is seen before every later look at f.
        await wait_after(log, mark, r"^attr-ok before$")
        mark = log.stat().st_size
        await files.set_exports("live", docs_only)
        (trees / "docs" / "revoked").touch()
        assert (await wait_after(log, mark, r"^attr-\w+ after$")) == "attr-fail after"
        await wait_after(log, mark, r"^ls \d+: docs $", timeout=10)
        line = await wait_after(log, mark, r"^path-fail ", timeout=10)
        # ENOENT, or EIO while the guest kernel keeps the directory's dentry
        # because the other shell's working directory pins it.
        assert re.search(r"No such file or directory|Input/output error", line), line
        line = await wait_after(log, mark, r"^held-fail ", timeout=10)
        assert "Input/output error" in line, line
        await asyncio.sleep(1.5)  # a few more rounds of both loops
        after = log.read_bytes()[mark:].decode(errors="replace")
        tail = after[after.index("held-fail") :]
        assert "held-ok" not in tail and "path-ok" not in tail and "extra " not in tail, tail
        assert "attr-ok after" not in after, after
        assert inst.state.value == "running"


async def test_a_removal_the_file_server_does_not_confirm_ends_the_vm(
    guest_dir: Path, short_tmp: Path, trees: Path
) -> None:
    # A server that does not answer (stopped here; a compromised or wedged one
    # alike) might still serve what is being revoked: revocation wins, the
    # server is ended and the VM with it, and the instance says why.
    async with in_process(guest_dir, short_tmp, trees, "sleep 600", control_timeout=2.0) as p:
        state, files, inst = p.state, p.files, p.inst
        await inst.start()
        (server,) = file_servers(state).values()
        (vmm,) = vmms(state).values()
        failed = asyncio.Event()
        inst.listeners.append(lambda i, _c: failed.set() if i.state.value == "failed" else None)
        os.kill(server, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(Failed, match="did not confirm the removal of export 'docs'"):
            await files.set_exports("live", {})
        assert 2.0 <= time.monotonic() - t < 10
        await asyncio.wait_for(failed.wait(), 20)
        assert inst.state.value == "failed", inst.state_reason
        assert "did not confirm the removal of export 'docs'" in inst.state_reason
        assert (
            not Path(f"/proc/{server}").exists()
            or "zombie" in Path(f"/proc/{server}/status").read_text()
        )
        assert vmm not in vmms(state).values()


async def test_a_directory_that_cannot_be_exported_fails_the_start_cleanly(
    daemon: Daemon, trees: Path
) -> None:
    # A resource whose path is missing, or has a symlink in it: the start fails
    # naming the export, and no VMM, file server or run directory is left.
    (trees / "link").symlink_to(trees / "docs")
    cfg = app_config(
        "sleep 600",
        gone={"application": "app", "resources": ["gone"]},
        linked={"application": "app", "resources": ["linked"]},
    )
    cfg["resources"] = {
        "gone": {"type": "directory", "path": str(trees / "no-such-dir")},
        "linked": {"type": "directory", "path": str(trees / "link")},
    }
    c = await daemon.start(cfg)
    for name, why in (("gone", "No such file or directory"), ("linked", "symbolic link")):
        e = await error_of(c.manager("StartInstance", "s", name))
        assert short(e.name) == "Failed", e
        assert f"export {name!r}" in e.message and why in e.message, e.message
        p = await props(c, name)
        assert p["State"] in ("stopped", "failed"), p
    assert vmms(daemon.state_dir) == {} and file_servers(daemon.state_dir) == {}
    assert sorted(os.listdir(daemon.state_dir / "run")) == []
