"""From an instance's definition and its drivers' contributions to a VmSpec."""

from __future__ import annotations

from pathlib import Path

from spectrumd.errors import Failed
from spectrumd.supervisor.resources import RunContext
from spectrumd.vmm.base import PORT_CONTROL, VmSpec

DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
# Unix socket paths are limited to 108 bytes (sun_path).
MAX_SOCKET_PATH = 107


def build_spec(ctx: RunContext, guest_dir: Path) -> VmSpec:
    """Raises Failed naming a missing kernel/initrd or a run directory too deep for sockets."""
    app = ctx.application
    kernel = app.kernel or guest_dir / "vmlinuz"
    initrd = app.initrd if app.kernel else guest_dir / "initramfs.img"
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not path.is_file():
            hint = "" if app.kernel else " (build the embedded guest: make guest)"
            raise Failed(f"cannot start {ctx.name}: {what} {path} not found{hint}")
    spec = VmSpec(
        instance=ctx.name,
        accel=ctx.definition.accel,
        memory_mib=app.memory_mib,
        vcpus=app.vcpus,
        kernel=kernel,
        initrd=initrd,
        cmdline=f"{DEFAULT_CMDLINE} {app.params}".strip(),
        run_dir=ctx.run_dir,
        arch=app.arch.value,
        ports=(PORT_CONTROL, *ctx.ports),
        nets=tuple(ctx.nets),
    )
    sockets = [spec.control_socket, spec.console_socket, *map(spec.port_socket, spec.ports)]
    if max(len(str(p)) for p in sockets) > MAX_SOCKET_PATH:
        raise Failed(f"cannot start {ctx.name}: state directory path is too long for sockets")
    return spec
