"""The service manager's descriptor store, spoken as systemd speaks it (sd_notify(3),
sd_listen_fds_with_names(3)): handing a descriptor over, and getting it back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spectrumd.daemon.notify import FdStore

CHILD = """
import json, os, socket
from spectrumd.daemon.notify import FdStore
store = FdStore.from_environment()
out = {"env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
fd = store.take("crosvm/x/console.sock")
out["console"] = socket.socket(fileno=fd).recv(16).decode() if fd is not None else None
out["again"] = store.take("crosvm/x/console.sock")
out["unclaimed"] = store.close_unclaimed()
print(json.dumps(out))
"""


def test_a_restarted_daemon_gets_its_descriptors_back_by_name() -> None:
    a, a_peer = socket.socketpair()
    b, _b_peer = socket.socketpair()
    a_peer.sendall(b"from crosvm")
    # As systemd starts a service: the descriptors from 3 on, LISTEN_PID the
    # service's own (the wrapper execs, keeping its pid).
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[3]])"
    )
    env = {
        **os.environ,
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "crosvm/x/console.sock:crosvm/y/fs.sock",
    }
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run(
        [sys.executable, "-c", wrapper, str(a.fileno()), str(b.fileno()), CHILD],
        pass_fds=(a.fileno(), b.fileno()),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(r.stdout)
    assert out == {
        "env": [],  # not passed on to the daemon's own children
        "console": "from crosvm",
        "again": None,
        "unclaimed": ["crosvm/y/fs.sock"],
    }


def test_descriptors_of_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    store = FdStore.from_environment()
    assert store.take("unknown") is None and store.close_unclaimed() == []
    assert not store.active and store.keep("x", 0) is False


def test_keep_hands_the_descriptor_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("LISTEN_PID", raising=False)
    store = FdStore.from_environment()
    ours, crosvm = socket.socketpair()
    assert store.keep("crosvm/x/console.sock", ours.fileno())
    msg, fds, _, _ = socket.recv_fds(manager, 1024, 4)
    assert msg == b"FDSTORE=1\nFDNAME=crosvm/x/console.sock"
    assert len(fds) == 1
    ours.close()  # the manager's copy keeps the connection
    kept = socket.socket(fileno=fds[0])
    crosvm.sendall(b"tick")
    assert kept.recv(4) == b"tick"
    store.forget("crosvm/x/console.sock")
    assert manager.recv(1024) == b"FDSTOREREMOVE=1\nFDNAME=crosvm/x/console.sock"
    kept.close()
    manager.close()
