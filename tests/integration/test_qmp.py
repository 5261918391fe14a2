"""The QMP client against a real QEMU started from ``QemuBackend.argv()``.

The guest never needs to run: QEMU starts with ``-S`` and the tests drive its
run state over QMP. QEMU loads ``-kernel`` while building the machine and
exits if the file is not a kernel (see test_bad_kernel_exits_before_qmp), so
the tests drop ``-kernel``/``-initrd``/``-append`` from the argv; everything
else, every socket and device, is what the supervisor runs. The run directory
has a comma in its name, so QEMU itself checks the comma escaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from spectrumd.model.types import Accel
from spectrumd.vmm.base import PORT_CONTROL, PORT_PORTAL, VmmError, VmSpec
from spectrumd.vmm.qemu import QemuBackend, QemuControl
from spectrumd.vmm.qmp import QmpClient, QmpError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

backend = QemuBackend()


def without_kernel(argv: list[str]) -> list[str]:
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-kernel", "-initrd", "-append"):
            next(args)
        else:
            out.append(arg)
    return out


@attrs.define
class Vm:
    spec: VmSpec
    proc: asyncio.subprocess.Process
    stderr: Path
    events: list[tuple[str, Mapping[str, Any]]] = attrs.Factory(list)
    changed: asyncio.Event = attrs.Factory(asyncio.Event)

    def on_event(self, name: str, data: Mapping[str, Any]) -> None:
        self.events.append((name, data))
        self.changed.set()

    async def wait_event(self, name: str) -> Mapping[str, Any]:
        async with asyncio.timeout(5):
            while True:
                for n, data in self.events:
                    if n == name:
                        return data
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def spawned(argv_filter: Any = without_kernel, **changes: Any) -> AsyncIterator[Vm]:
    # pytest's tmp_path can exceed the 107 bytes of a unix socket path.
    run_dir = Path(tempfile.mkdtemp(prefix="spq,", dir="/tmp"))
    spec = VmSpec(
        instance="t",
        accel=Accel.tcg,
        memory_mib=64,
        vcpus=1,
        kernel=run_dir / "vmlinuz",
        initrd=None,
        cmdline="console=ttyS0",
        run_dir=run_dir,
        ports=(PORT_CONTROL, PORT_PORTAL),
    )
    spec = attrs.evolve(spec, **changes)
    stderr = run_dir / "stderr"
    proc = None
    try:
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv_filter(backend.argv(spec)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
        yield Vm(spec, proc, stderr)
    finally:
        if proc is not None:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def attached(**changes: Any) -> AsyncIterator[tuple[Vm, QemuControl]]:
    async with spawned(**changes) as vm:
        control = await backend.attach(vm.spec, vm.on_event, timeout=10)
        try:
            yield vm, control
        finally:
            await control.close()


async def test_run_states() -> None:
    async with attached() as (vm, control):
        assert await control.query_status() == "prelaunch"
        await control.start_cpus()
        assert await control.query_status() == "running"
        await vm.wait_event("RESUME")
        await control.pause()
        assert await control.query_status() == "paused"
        await vm.wait_event("STOP")
        await control.resume()
        assert await control.query_status() == "running"
        # Concurrent commands are matched to their replies by id.
        results = await asyncio.gather(*(control.query_status() for _ in range(20)))
        assert results == ["running"] * 20
        # Every socket of the argv exists, also under a directory with a comma.
        for sock in ("vmm.sock", "console.sock", "control.sock", "portal.sock"):
            assert (vm.spec.run_dir / sock).is_socket()


async def test_error_reply() -> None:
    async with attached() as (_, control):
        with pytest.raises(QmpError) as info:
            await control.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert str(info.value).startswith("QMP no-such-command failed: CommandNotFound: ")
        with pytest.raises(QmpError, match=r"^QMP device_del failed: DeviceNotFound: "):
            await control.execute("device_del", {"id": "nothing"})
        # The connection is still usable after an error.
        assert await control.query_status() == "prelaunch"


async def test_quit_ends_qemu() -> None:
    async with attached() as (vm, control):
        await control.start_cpus()
        await control.quit()
        async with asyncio.timeout(10):
            assert await vm.proc.wait() == 0
            await control.wait_closed()
        assert ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}) in vm.events
        assert control.closed
        with pytest.raises(VmmError, match="QMP connection closed"):
            await control.query_status()


async def test_connection_loss_fails_pending_calls() -> None:
    async with attached() as (vm, control):
        # A stopped QEMU never answers: the call stays pending until it dies.
        vm.proc.send_signal(signal.SIGSTOP)
        pending = asyncio.create_task(control.query_status())
        await asyncio.sleep(0.2)
        assert not pending.done()
        vm.proc.kill()
        await vm.proc.wait()
        with pytest.raises(VmmError, match=r"^QMP connection closed$"):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(VmmError, match="QMP connection closed"):
            await control.pause()


async def test_close_fails_pending_calls() -> None:
    async with attached() as (vm, control):
        vm.proc.send_signal(signal.SIGSTOP)
        pending = asyncio.create_task(control.query_status())
        await asyncio.sleep(0.1)
        await control.close()
        with pytest.raises(VmmError, match="QMP connection closed"):
            await pending


async def test_attach_times_out_without_qemu() -> None:
    run_dir = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        spec = VmSpec(
            instance="t",
            accel=Accel.tcg,
            memory_mib=64,
            vcpus=1,
            kernel=run_dir / "k",
            initrd=None,
            cmdline="",
            run_dir=run_dir,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(VmmError, match="did not answer within"):
            await backend.attach(spec, lambda n, d: None, timeout=0.3)
        assert loop.time() - t0 < 2
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_bad_kernel_exits_before_qmp() -> None:
    """What the supervisor sees when the kernel cannot be loaded."""
    async with spawned(argv_filter=lambda argv: argv) as vm:
        async with asyncio.timeout(10):
            assert await vm.proc.wait() == 1
        err = vm.stderr.read_text()
        assert f"could not open kernel file '{vm.spec.kernel}'" in err
        # The socket file is left behind but nobody listens.
        with pytest.raises(VmmError):
            await backend.attach(vm.spec, vm.on_event, timeout=0.3)


async def test_cancelled_close_still_ends_the_connection_quietly() -> None:
    # A close cut short (a Kill cancelling a teardown, a deadline) still ends
    # the connection; nothing is left pending or with an error nobody reads.
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reports.append(context))
    try:
        for steps in range(4):
            async with spawned() as vm:
                control = await backend.attach(vm.spec, vm.on_event, timeout=10)
                closing = asyncio.create_task(control.close())
                for _ in range(steps):
                    await asyncio.sleep(0)
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
                vm.proc.kill()
                await vm.proc.wait()
                await asyncio.sleep(0.1)
                assert control.closed
            del control, closing
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [r["message"] for r in reports] == [], [
        (r["message"], repr(r.get("future") or r.get("task"))) for r in reports
    ]


async def test_a_connect_cancelled_twice_ends_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A peer that accepts and never greets (a QEMU wedged at start); the
    # caller is cancelled during the negotiation and again at once (a
    # deadline, then a Kill). The library's connect is cancelled once and
    # cleans up: no "bug in the QMP library", no error nobody reads.
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reports.append(context))
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    try:
        for gap in range(4):
            caller = asyncio.ensure_future(QmpClient.connect(path, lambda n, d: None, 10))
            await asyncio.sleep(0.2)  # connected, waiting for the greeting
            caller.cancel()
            for _ in range(gap):
                await asyncio.sleep(0)
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
            await asyncio.sleep(0.2)
            del caller
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
        listener.close()
    critical = [r.getMessage()[:80] for r in caplog.records if r.levelname == "CRITICAL"]
    assert critical == []
    assert [r["message"] for r in reports] == []
