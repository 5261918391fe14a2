"""Root images: the superblock check, its configuration errors, and the guest's parameters."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from spectrumd.errors import ConfigError
from spectrumd.model import parse_config
from spectrumd.model.image import ImageError, ImageFs, parse_superblock, probe_image
from spectrumd.model.types import Application, Disk
from spectrumd.supervisor.spec import root_cmdline

MIB = 1024 * 1024


def erofs_header(blkszbits: int = 12) -> bytes:
    h = bytearray(2048)
    h[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    h[1024 + 12] = blkszbits
    return bytes(h)


def ext4_header(log_block: int = 2) -> bytes:
    h = bytearray(2048)
    h[1080:1082] = (0xEF53).to_bytes(2, "little")
    h[1024 + 24 : 1024 + 28] = log_block.to_bytes(4, "little")
    return bytes(h)


def image(tmp_path: Path, header: bytes, size: int = 2 * MIB, name: str = "r.img") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(header)
        f.truncate(size)
    return p


def test_superblocks() -> None:
    assert parse_superblock(erofs_header()) == (ImageFs.erofs, 4096)
    assert parse_superblock(ext4_header(0)) == (ImageFs.ext4, 1024)
    assert parse_superblock(bytes(2048)) is None
    assert parse_superblock(erofs_header()[:1500]) is None
    # The magic byte-swapped is not the magic.
    swapped = bytearray(2048)
    swapped[1080:1082] = b"\xef\x53"
    assert parse_superblock(bytes(swapped)) is None


@pytest.mark.parametrize(
    ("header", "size", "share", "message"),
    [
        (bytes(2048), 2 * MIB, False, "is not an erofs or ext4 image"),
        (b"hsqs" + bytes(2044), 2 * MIB, False, "is not an erofs or ext4 image"),
        (erofs_header(), 100, False, "is not an erofs or ext4 image"),  # truncated
        (erofs_header(), 3 * MIB, True, "must be a multiple of 2 MiB"),
        (ext4_header(0), 2 * MIB, True, "has 1024-byte blocks"),
    ],
)
def test_bad_images(tmp_path: Path, header: bytes, size: int, share: bool, message: str) -> None:
    p = image(tmp_path, header, size)
    with pytest.raises(ImageError, match=message) as e:
        probe_image(p, share=share)
    assert str(p) in str(e.value) and not e.value.missing


def test_good_images_and_missing(tmp_path: Path) -> None:
    info = probe_image(image(tmp_path, erofs_header(), 4 * MIB), share=True)
    assert (info.fstype, info.size, info.block_size) == (ImageFs.erofs, 4 * MIB, 4096)
    # Unaligned and 1 KiB blocks are fine for a plain read-only disk.
    assert probe_image(image(tmp_path, ext4_header(0), MIB + 5), share=False).fstype is ImageFs.ext4
    with pytest.raises(ImageError, match="not found") as e:
        probe_image(tmp_path / "nope", share=False)
    assert e.value.missing


def test_a_fifo_or_directory_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path):
        with pytest.raises(ImageError, match=r"not a regular file|Is a directory"):
            probe_image(p, share=False)


def app_cfg(app: dict[str, object]) -> dict[str, object]:
    return {
        "applications": {"app": {"command": "true", **app}},
        "instances": {"one": {"application": "app"}},
    }


def test_config_names_the_bad_image(tmp_path: Path) -> None:
    bad = image(tmp_path, bytes(2048))
    with pytest.raises(ConfigError) as e:
        parse_config(app_cfg({"root_image": str(bad)}))
    assert str(e.value).startswith(f"applications.app.root_image: root image {bad} is not an erofs")
    odd = image(tmp_path, erofs_header(), 3 * MIB, "odd.img")
    with pytest.raises(ConfigError, match=r"applications.app.root_image: .* multiple of 2 MiB"):
        parse_config(app_cfg({"root_image": str(odd), "share_root": True}))
    # Not shared, the same image is fine; a missing one is left to the start.
    parse_config(app_cfg({"root_image": str(odd)}))
    parse_config(app_cfg({"root_image": str(tmp_path / "later.img"), "share_root": True}))


@pytest.mark.parametrize(
    ("disks", "message"),
    [
        (
            [{"path": "/o.img", "overlay": True}],
            "disks[0].overlay: an overlay disk must be writable",
        ),
        (
            [{"path": "/a", "writable": True, "overlay": True}] * 2,
            "disks[1].overlay: only one disk can hold the overlay",
        ),
    ],
)
def test_overlay_disk_rules(disks: list[object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(app_cfg({"root_image": "/r.img", "disks": disks}))


def test_overlay_disk_needs_a_root_image() -> None:
    with pytest.raises(
        ConfigError, match=r"applications.app.disks\[0\].overlay: needs a root_image"
    ):
        parse_config(app_cfg({"disks": [{"path": "/a", "writable": True, "overlay": True}]}))


def test_guest_parameters_name_the_devices() -> None:
    app = Application(name="a", command="true", root_image=Path("/r.img"))
    assert root_cmdline(app, "erofs") == "spectrum.root=vda spectrum.rootfstype=erofs"
    disks = (Disk(Path("/d0")), Disk(Path("/d1"), writable=True, overlay=True))
    shared = Application(
        name="a", command="true", root_image=Path("/r.img"), share_root=True, disks=disks
    )
    # pmem0 is no virtio-blk disk: the disks start at vda.
    assert root_cmdline(shared, "ext4") == (
        "spectrum.root=pmem0 spectrum.rootfstype=ext4 swiotlb=2048 spectrum.root_rw=vdb"
    )
    plain = Application(name="a", command="true", root_image=Path("/r.img"), disks=disks)
    assert root_cmdline(plain, "ext4").endswith("spectrum.root_rw=vdc")


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")
def test_real_erofs_and_ext4_images_are_recognised(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f").write_text("x")
    erofs, ext4 = tmp_path / "a.erofs", tmp_path / "a.ext4"
    subprocess.run(
        ["mkfs.erofs", str(erofs), str(tmp_path / "root")], check=True, capture_output=True
    )
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tmp_path / "root"), str(ext4), "4M"],
        check=True,
    )
    assert probe_image(erofs, share=False).fstype is ImageFs.erofs
    assert probe_image(ext4, share=True).fstype is ImageFs.ext4
