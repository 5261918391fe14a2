"""Integration: the Linux v9fs client in the default guest mounts our server.

Boots one QEMU guest (TCG, ~10 s), so it runs only when asked for:
``pytest -m integration`` or ``SPECTRUM_GUEST_TESTS=1``. Needs QEMU and the
guest built by ``guest/build.sh`` (``SPECTRUM_GUEST_DIR``, default
``/var/cache/spectrumd/guest``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from spectrumd.fileserver.client import FileServerClient

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(os.environ.get("SPECTRUM_GUEST_DIR", "/var/cache/spectrumd/guest"))

pytestmark = pytest.mark.integration


def _wanted(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return os.environ.get("SPECTRUM_GUEST_TESTS") == "1" or (
        "integration" in expr and "not integration" not in expr
    )


def test_linux_client_through_the_fs_port(request: pytest.FixtureRequest) -> None:
    if not _wanted(request.config):
        pytest.skip("boots a VM: run with -m integration or SPECTRUM_GUEST_TESTS=1")
    if not (GUEST / "vmlinuz").exists() or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs QEMU and the built default guest")
    sys.path.insert(0, str(REPO / "guest"))
    import test_boot as tb  # the guest contract harness (guest/test_boot.py)

    base = Path(tempfile.mkdtemp(prefix="fs-guest-"))
    docs, work = base / "docs", base / "work"
    docs.mkdir()
    work.mkdir()
    (docs / "from-host").write_text("host-data-42\n")
    os.symlink("/etc", docs / "etc-link")
    ctl = base / "ctl.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "spectrumd.fileserver", "--control", str(ctl)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    orig_argv = tb.qemu_argv

    def argv(out: str, run: str, fs: bool) -> list[str]:
        # The harness passes diod an aname; ours serves the synthetic root.
        drop = f" spectrum.fs_options=aname={run}/export"
        return [a.replace(drop, "") for a in orig_argv(out, run, fs)]

    class Guest(tb.Guest):  # type: ignore[misc, name-defined]
        def _start_file_server(self, sock: socket.socket) -> None:
            async def hand_over() -> None:
                client = FileServerClient()
                await client.connect(str(ctl))
                await client.set_exports(
                    "g", {"docs": (str(docs), False), "work": (str(work), True)}
                )
                await client.serve("g", sock)
                client.close()

            asyncio.run(hand_over())
            sock.close()

    tb.qemu_argv = argv
    g: Any = None
    try:
        g = Guest(str(GUEST), fs=True)
        g.expect("ready", 60)
        g.send("run " + tb.b64(
            "cd /mnt/spectrum && ls docs && cat docs/from-host"
            " && ! echo x > docs/new && ! ln -s x work/l"
            " && echo a > work/f && echo b >> work/f"
            " && dd if=/dev/zero of=work/big bs=64k count=32 2>/dev/null"
            " && mkdir work/d && mv work/f work/d/g && sync && echo fs-ok"
        ))  # fmt: skip
        assert g.expect("exited", 60) == "exited 0", g.console.decode(errors="replace")
        assert b"host-data-42" in g.console
        assert (work / "d" / "g").read_text() == "a\nb\n"
        assert (work / "big").stat().st_size == 32 * 65536
        assert sorted(os.listdir(docs)) == ["etc-link", "from-host"]
    finally:
        tb.qemu_argv = orig_argv
        if g is not None:
            g.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(base)
