"""From an instance's definition and its drivers' contributions to a VmSpec."""

from __future__ import annotations

from pathlib import Path

from spectrumd.errors import Failed
from spectrumd.model.image import ImageError, probe_image
from spectrumd.model.types import Application, VmmKind, WaylandResource
from spectrumd.supervisor.resources import RunContext
from spectrumd.supervisor.usb import usb_capable
from spectrumd.vmm import BACKENDS
from spectrumd.vmm.base import PORT_CONTROL, VmSpec

CMDLINE_TAIL = "panic=-1 quiet"
# Spare PCIe root ports for networks attached at run time (QEMU q35/virt need
# one per hot-added device). Not passed to crosvm: --pci-hotplug-slots exists
# only in crosvm builds with the pci-hotplug feature, and others refuse it.
QEMU_HOTPLUG_SLOTS = 2
# swiotlb slabs (2 KiB each) in a guest with a shared root image; see root_cmdline.
SHARED_SWIOTLB_SLABS = 2048
# Unix socket paths are limited to 108 bytes (sun_path).
MAX_SOCKET_PATH = 107


def build_spec(ctx: RunContext, guest_dir: Path) -> VmSpec:
    """The VmSpec of this start; also readies the backend's host side (before the spawn).

    Raises Failed naming a missing kernel, initrd, root image or disk, a
    run directory too deep for sockets, or host-side sockets that cannot be made.
    """
    app = ctx.application
    backend = BACKENDS[ctx.definition.vmm]
    kernel = app.kernel or guest_dir / "vmlinuz"
    initrd = app.initrd if app.kernel else guest_dir / "initramfs.img"
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not path.is_file():
            hint = "" if app.kernel else " (build the embedded guest: make guest)"
            raise Failed(f"cannot start {ctx.name}: {what} {path} not found{hint}")
    root_size = 0
    root_params = ""
    if app.root_image is not None:
        try:
            image = probe_image(app.root_image, share=app.share_root)
        except ImageError as e:
            raise Failed(f"cannot start {ctx.name}: {e}") from None
        root_size = image.size
        root_params = root_cmdline(app, image.fstype.value)
    for disk in app.disks:
        if not disk.path.exists():
            raise Failed(f"cannot start {ctx.name}: disk {disk.path} not found")
    try:
        console = backend.kernel_console(app.arch.value)
    except ValueError as e:
        raise Failed(f"cannot start {ctx.name}: {e}") from None
    spec = VmSpec(
        instance=ctx.name,
        accel=ctx.definition.accel,
        memory_mib=app.memory_mib,
        vcpus=app.vcpus,
        kernel=kernel,
        initrd=initrd,
        cmdline=" ".join(
            p for p in (f"console={console}", CMDLINE_TAIL, root_params, app.params) if p
        ),
        run_dir=ctx.run_dir,
        arch=app.arch.value,
        ports=(PORT_CONTROL, *ctx.ports),
        nets=tuple(ctx.nets),
        root_image=app.root_image,
        root_image_size=root_size,
        share_root=app.share_root,
        disks=app.disks,
        wayland_sockets=tuple(r.path for r in ctx.resources if isinstance(r, WaylandResource)),
        hotplug_slots=QEMU_HOTPLUG_SLOTS if ctx.definition.vmm is VmmKind.qemu else 0,
        usb=usb_capable(ctx.definition.vmm, ctx.resources),
        vmm_uid=ctx.ids.vmm if ctx.ids is not None else None,
        fs_fd=ctx.fs_fd,
    )
    sockets = [spec.control_socket, spec.console_socket, *map(spec.port_socket, spec.ports)]
    # crosvm's side of each serial socket is "vmm-" + the name (spectrumd.vmm.crosvm).
    extra = len("vmm-") if backend.vmm_connects else 0
    if max(len(str(p)) for p in sockets) + extra > MAX_SOCKET_PATH:
        raise Failed(f"cannot start {ctx.name}: state directory path is too long for sockets")
    try:
        spec = backend.prepare(spec, ctx.stack)
    except OSError as e:
        raise Failed(f"cannot start {ctx.name}: cannot listen for the VMM: {e}") from None
    return spec


def root_cmdline(app: Application, fstype: str) -> str:
    """The guest's root-image parameters (guest/README.md): its device and file system.

    Both backends attach the root image first: as the first virtio-blk disk
    (vda), or as the only virtio-pmem device (pmem0) when shared; the other
    disks follow in order, so the overlay disk's name follows from its index.
    """
    params = [
        f"spectrum.root={'pmem0' if app.share_root else 'vda'}",
        f"spectrum.rootfstype={fstype}",
    ]
    if app.share_root:
        # The pmem region lies above 4 GiB, so the kernel sets up swiotlb's
        # default 64 MiB of bounce buffers (for devices that cannot reach
        # it), zeroed in every guest's RAM: the size of a small image, again
        # per instance. Virtio devices need none of it; keep 4 MiB (2048 slabs).
        params.append(f"swiotlb={SHARED_SWIOTLB_SLABS}")
    first = 0 if app.share_root else 1
    for i, disk in enumerate(app.disks):
        if disk.overlay:
            params.append(f"spectrum.root_rw=vd{chr(ord('a') + first + i)}")
    return " ".join(params)
