"""Applications run from their own root images, on real guests, through the daemon.

Images are made with scripts/mkimage.sh: a Debian one with python3 (cached in
/var/cache/spectrumd/images, like the demo's), and static-busybox ones made
per test. Four boots in all: two instances sharing one image (with a grant
asked for from inside it), one from a virtio-blk ext4 image with a writable
overlay disk, one from an image whose superblock magic is right and whose
body is garbage; the other bad images need none.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrumd.bus.names import instance_path
from spectrumd.model.image import EROFS_MAGIC
from tests import images
from tests.conftest import Daemon, readable_tmpdir
from tests.images import mkimage
from tests.integration.helpers import (
    SignalRecorder,
    error_of,
    file_servers,
    marked_dir,
    props,
    short,
    vmms,
    wait_for,
    wait_log,
)
from tests.integration.test_grants import register_agent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SPECTRUM_SHA = hashlib.sha256(b"spectrum").hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def python_image() -> Path:
    return images.python_image()


@pytest.fixture
def work() -> Iterator[Path]:
    with readable_tmpdir("img.") as d:
        yield d


def image_config(app: dict[str, Any], **instances: dict[str, Any]) -> dict[str, Any]:
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 20},
        "applications": {"app": {"memory_mib": 192, **app}},
        "resources": {},
        "instances": instances or {"one": {"application": "app"}},
    }


def vmm_maps(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


# Runs inside the image: python3 exists only there (the initramfs has busybox).
SHARED_APP = r"""
echo "HASH $(python3 -c 'import hashlib; print(hashlib.sha256(b"spectrum").hexdigest())')"
echo "LOWER $(grep ' /run/spectrum-image/lower ' /proc/1/mounts)"
[ -e /sys/block/pmem0 ] && echo "PMEM yes"
echo "ROOT $(grep -c PRETTY_NAME /etc/os-release)"
echo hi >/made-here && echo "OVERLAY $(cat /made-here)"
dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 conv=notrunc 2>/dev/null; echo "DEVWRITE $?"
echo "DOCS $(cat /mnt/spectrum/docs/marker 2>&1)"
granted=$(spectrum-request dir @GRANT@ 2>&1); echo "PORTAL $? $granted"
echo "GRANTED $(cat "$granted/marker" 2>&1)"
blockdev --setrw /dev/pmem0 && dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 conv=notrunc oflag=direct 2>/dev/null
echo "MAGIC $(dd if=/dev/pmem0 bs=4096 count=1 iflag=direct 2>/dev/null | od -An -tx1 -j1024 -N4 | tr -d ' ')"
echo DONE
exec sleep 600
"""


@pytest.fixture
def grant_dir() -> Iterator[Path]:
    with marked_dir("imgrant.", "granted-marker") as d:
        yield d


async def test_two_instances_share_one_python_image(
    daemon: Daemon, python_image: Path, work: Path, grant_dir: Path
) -> None:
    (work / "marker").write_text("docs-marker\n")
    (work / "marker").chmod(0o644)
    before = digest(python_image)
    app = SHARED_APP.replace("@GRANT@", str(grant_dir))
    cfg = image_config(
        {"command": app, "root_image": str(python_image), "share_root": True},
        a={"application": "app", "resources": ["docs"]},
        b={"application": "app", "resources": ["docs"]},
    )
    cfg["resources"] = {"docs": {"type": "directory", "path": str(work)}}
    c = await daemon.start(cfg)
    # The user allows what the application asks for from inside its image.
    _agent_client, agent = await register_agent(daemon.address, True)
    await asyncio.gather(*(c.manager("StartInstance", "s", n) for n in ("a", "b")))
    pids = []
    for name in ("a", "b"):
        p = await props(c, name)
        pids.append(p["MainPID"])
        out = await wait_log(Path(p["ConsoleLog"]), "DONE", timeout=120)
        lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        assert lines["HASH"] == SPECTRUM_SHA, out[-2000:]
        # The image is mounted read-only with DAX from the pmem device.
        lower = lines["LOWER"].split()
        assert lower[0] == "/dev/pmem0" and lower[2] == "erofs", lines["LOWER"]
        assert "ro" in lower[3].split(",") and "dax" in lower[3], lines["LOWER"]
        assert lines["PMEM"] == "yes"
        assert lines["ROOT"] == "1"  # Debian's /etc/os-release: the image is the root
        assert lines["OVERLAY"] == "hi"  # a writable layer over it
        assert lines["DEVWRITE"] != "0", "the guest wrote to its image's device"
        # Guest root clearing the flag and writing over the superblock changes
        # nothing: QEMU maps the image read-only and drops the writes.
        assert lines["MAGIC"] == "e2e1f5e0", "a guest's write reached the shared image"
        assert lines["DOCS"] == "docs-marker", out[-2000:]  # the shared files, bound in
        # spectrum-request from inside the image: the agent allowed it, the new
        # entry appeared under /mnt/spectrum in the image, and it reads the host's file.
        assert lines["PORTAL"] == f"0 /mnt/spectrum/{grant_dir.name}", out[-2000:]
        assert lines["GRANTED"] == "granted-marker", out[-2000:]
        # The guest agent (PID 1, outside the image) said ready.
        assert (await props(c, name))["GuestReady"] is True
    assert sorted(q[1] for q in agent.asked) == ["a", "b"]
    assert all(q[3] == str(grant_dir) for q in agent.asked), agent.asked
    # Both VMMs map the one file: their guests read the host's page cache.
    assert all(vmm_maps(pid, python_image) for pid in pids)
    await asyncio.gather(*(c.manager("StopInstance", "s", n) for n in ("a", "b")))
    for name in ("a", "b"):
        # The power button reached the guest agent while the application ran
        # in the image: a graceful stop, not a SIGTERM or SIGKILL.
        p = await props(c, name)
        assert p["State"] == "stopped", p
        assert p["StateReason"] == "the guest shut down after the power button", p
    assert digest(python_image) == before, "a guest changed the shared image"


BLK_APP = r"""
echo "LOWER $(grep ' /run/spectrum-image/lower ' /proc/1/mounts)"
echo "MARK $(cat /data/mark)"
echo "RW $(grep ' /run/spectrum-image/rw ' /proc/1/mounts | cut -d' ' -f1,3)"
echo kept >/data/written && echo "WROTE $(cat /data/written)"
echo junk >/data/mark 2>/dev/null; echo "SHADOW $(cat /data/mark)"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=notrunc 2>/dev/null; echo "DEVWRITE $?"
blockdev --setrw /dev/vda 2>/dev/null
dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=notrunc oflag=direct 2>/dev/null; echo "FORCED $?"
ls /sys/block/pmem0 >/dev/null 2>&1 || echo "PMEM no"
exit 7
"""


async def test_blk_ext4_image_with_overlay_disk(daemon: Daemon, work: Path) -> None:
    (work / "mark").write_text("from-the-image\n")
    image = mkimage(
        work / "bb.ext4", "--busybox", "--fs", "ext4", "--add", f"{work / 'mark'}:/data/mark"
    )
    upper = work / "upper.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(upper), "32M"], check=True)
    before = digest(image)
    disks = [{"path": str(upper), "writable": True, "overlay": True}]
    c = await daemon.start(
        image_config({"command": BLK_APP, "root_image": str(image), "disks": disks})
    )
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    p = await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=120)
    # The command's exit status comes back through the guest agent.
    assert "status 7" in p["StateReason"], p["StateReason"]
    out = log.read_text(errors="replace")
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    lower = lines["LOWER"].split()
    assert lower[0] == "/dev/vda" and lower[2] == "ext4" and "ro" in lower[3].split(","), out
    assert "dax" not in lower[3]
    assert lines["MARK"] == "from-the-image"
    assert lines["RW"] == "/dev/vdb ext4"
    assert lines["WROTE"] == "kept" and lines["SHADOW"] == "junk"
    assert lines["DEVWRITE"] != "0" and lines["PMEM"] == "no"
    # Guest root clearing the read-only flag gets no further: QEMU refuses.
    assert lines["FORCED"] != "0", out
    assert digest(image) == before, "the guest changed its read-only image"
    # What it wrote went to the overlay disk, and outlives the VM.
    kept = subprocess.run(
        ["debugfs", "-R", "cat /upper/data/written", str(upper)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert kept.stdout.strip() == "kept"


async def assert_start_refused(daemon: Daemon, c: Any, name: str, text: str) -> None:
    e = await error_of(c.manager("StartInstance", "s", name))
    assert short(e.name) == "Failed" and text in e.message, (e.name, e.message)
    p = await props(c, name)
    assert p["State"] == "failed" and p["MainPID"] == 0
    assert not (daemon.state_dir / "run" / name).exists(), "a refused start left its run dir"


async def test_bad_images_are_refused_before_anything_runs(daemon: Daemon, work: Path) -> None:
    img = work / "app.img"
    cfg = image_config(
        {"command": "echo never", "root_image": str(img), "share_root": True},
    )
    # Missing: the configuration is accepted (the image may come later), the start is not.
    c = await daemon.start(cfg)
    await assert_start_refused(daemon, c, "one", f"root image {img} not found")

    # Corrupt (no superblock) or of another file system: refused at start, and
    # a configuration naming it is refused by Reload with the key path.
    for content in (b"\0" * (2 << 20), b"hsqs" + b"\0" * ((2 << 20) - 4)):  # squashfs
        img.write_bytes(content)
        await assert_start_refused(daemon, c, "one", "is not an erofs or ext4 image")
        e = await error_of(c.manager("Reload"))
        assert short(e.name) == "InvalidArgument"
        assert e.message.startswith("applications.app.root_image: root image"), e.message

    # Wrongly sized for pmem: a real erofs image one page short of 2 MiB alignment.
    bb = mkimage(work / "bb.erofs", "--busybox")
    with open(bb, "r+b") as f:
        f.truncate(bb.stat().st_size - 4096)
    shutil.copy(bb, img)
    await assert_start_refused(daemon, c, "one", "must be a multiple of 2 MiB")
    # No VMM process was left: nothing of ours maps or names the image.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(img).encode() not in cmdline, f"process {pid} was started on the bad image"


async def test_an_image_that_does_not_mount_fails_with_the_guests_reason(
    daemon: Daemon, work: Path
) -> None:
    # The host sees a good erofs superblock magic (and 4 KiB blocks, 2 MiB
    # aligned), so the start goes ahead; the rest is garbage, and the guest's
    # mount refuses it.
    img = work / "garbage.erofs"
    body = bytearray(random.Random(16).randbytes(4 << 20))
    body[1024:1028] = EROFS_MAGIC.to_bytes(4, "little")
    body[1024 + 12] = 12  # blkszbits: 4 KiB
    img.write_bytes(bytes(body))
    img.chmod(0o644)
    c = await daemon.start(
        image_config({"command": "echo never", "root_image": str(img), "share_root": True})
    )
    rec = await SignalRecorder().attach(c)
    await c.manager("StartInstance", "s", "one")
    log = Path((await props(c, "one"))["ConsoleLog"])
    p = await wait_for(c, "one", lambda p: p["State"] in ("stopped", "failed"), timeout=120)
    # Failed, in the guest's words: not a clean "the guest powered off".
    assert p["State"] == "failed", p
    assert p["StateReason"].startswith(
        "the guest could not start the application: root image: cannot mount /dev/pmem0 (erofs)"
    ), p["StateReason"]
    assert rec.states(instance_path("one"))[-2:] == ["stopping", "failed"]
    assert not p["GuestReady"] and p["MainPID"] == 0
    assert "never" not in log.read_text(errors="replace")
    # Nothing is left: no VMM, no file server, no run directory.
    assert vmms(daemon.state_dir) == {} and file_servers(daemon.state_dir) == {}
    assert not (daemon.state_dir / "run" / "one").exists()
