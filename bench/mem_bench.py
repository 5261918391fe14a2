"""What a shared root image saves: ``.venv/bin/python bench/mem_bench.py``.

Builds (once, cached) an erofs image holding a static busybox and 64 MiB of
random data, then, for share_root off and on, starts 1 to 4 instances of one
application one after the other. Each guest says BOOTED, waits, reads the
64 MiB (``cat /data/blob >/dev/null``) and says READ. The host's memory for
those VMs is measured before and after each read:

    total = sum over the VMMs of (PSS - PSS of their mapping of the image)
            + the image's pages in the host's page cache (fincore)

so that the image's pages count once, whoever maps or caches them. "read
cost" is what one instance's read added to that total; the goal is <= 10 % of
the 64 MiB for every instance after the first with share_root, where without
it each instance keeps its own copy in its guest's RAM (about 100 %).

Also prints the time from StartInstance to the application's first output
(the command's first word is an ``echo FIRST``, before anything else it
does): the embedded guest alone, and booted into the image from virtio-blk
and from virtio-pmem. ``--only first-output`` measures just that (three
boots, no memory series); ``--only memory`` just the memory. One run, one
table per part; everything started is ended by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from common import CallFailed, checked_call, child, kill_our_vmms, private_bus
from dbus_fast import Message
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parent.parent
BUS_NAME = "org.spectrum_os.Spectrum1"
MANAGER_PATH = "/org/spectrum_os/Spectrum1"
MANAGER_IFACE = "org.spectrum_os.Spectrum1.Manager"
IMAGES = Path(os.environ.get("SPECTRUMD_IMAGE_DIR", "/var/cache/spectrumd/images"))
BLOB_MIB = 64
GOAL = 0.10
# FIRST at once: the time to the application's first output is the boot's, not
# the memory measurement's warming and waiting that follow. Then a first read
# of a small file of the same image: what the read of the blob costs besides
# its data (TCG translating cat's and erofs's code, the guest's slabs) comes
# before the measurement. Then long enough to measure the guest before it reads.
COMMAND = (
    "echo FIRST; cat /data/warm >/dev/null; sleep 2; echo BOOTED; sleep 4; "
    "cat /data/blob >/dev/null && echo READ; exec sleep 600"
)


def build_image() -> Path:
    """The cached bench image; its data is the same every run (seeded), so it stays cached."""
    data = IMAGES / "bench-data"
    blob = data / "blob"
    if not blob.exists() or blob.stat().st_size != BLOB_MIB << 20:
        data.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(random.Random(16).randbytes(BLOB_MIB << 20))
    if not (data / "warm").exists():
        (data / "warm").write_bytes(random.Random(17).randbytes(1 << 20))
    out = IMAGES / f"bench-{BLOB_MIB}m.erofs"
    subprocess.run(
        ["sh", str(ROOT / "scripts/mkimage.sh"), "--busybox", "--add", f"{data}:/data", str(out)],
        check=True,
    )
    return out


def config(image: Path | None, share: bool, n: int) -> dict[str, Any]:
    app: dict[str, Any] = {"command": COMMAND, "memory_mib": 256}
    if image is not None:
        app.update(root_image=str(image), share_root=share)
    return {
        "defaults": {"vmm": "qemu", "accel": "tcg", "stop_timeout": 10},
        "applications": {"app": app},
        "instances": {f"i{k}": {"application": "app"} for k in range(1, n + 1)},
    }


def smaps_kib(pid: int, image: Path) -> tuple[int, int]:
    """(PSS of the process, PSS of its mappings of ``image``) in KiB."""
    total = image_pss = 0
    in_image = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header
            in_image = len(head) == 6 and head[5] == str(image)
        elif line.startswith("Pss:"):
            kib = int(line.split()[1])
            total += kib
            if in_image:
                image_pss += kib
    return total, image_pss


def page_cache_kib(image: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip() or 0) // 1024


def drop_cache(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def host_memory_mib(pids: list[int], image: Path) -> float:
    kib = page_cache_kib(image)
    for pid in pids:
        total, mapped = smaps_kib(pid, image)
        kib += total - mapped
    return kib / 1024


class Run:
    """One spectrumd on a private bus; its instances started one by one."""

    def __init__(self, bus: MessageBus, state: Path) -> None:
        self.bus = bus
        self.state = state

    async def call(self, member: str, sig: str = "", *args: Any) -> Message:
        msg = Message(
            destination=BUS_NAME,
            path=MANAGER_PATH,
            interface=MANAGER_IFACE,
            member=member,
            signature=sig,
            body=list(args),
        )
        return await checked_call(self.bus, msg, member)

    async def pid(self, name: str) -> int:
        path = (await self.call("GetInstance", "s", name)).body[0]
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface="org.freedesktop.DBus.Properties",
                member="Get",
                signature="ss",
                body=["org.spectrum_os.Spectrum1.Instance", "MainPID"],
            )
        )
        assert reply is not None and reply.body, reply
        return int(reply.body[0].value)

    async def wait_line(self, name: str, word: str, timeout: float = 120) -> float:
        """Until the console log has a line ``word``; returns when it was seen."""
        log = self.state / "logs" / name / "console.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and f"\n{word}" in "\n" + log.read_text(errors="replace"):
                return time.monotonic()
            await asyncio.sleep(0.02)
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
        raise RuntimeError(f"{name}: no {word!r} in its console after {timeout:g}s:\n{tail}")


@contextlib.asynccontextmanager
async def spectrumd(cfg: dict[str, Any], guest_dir: str | None) -> AsyncIterator[Run]:
    work = Path(tempfile.mkdtemp(prefix="memb.", dir="/tmp"))
    state = work / "state"
    (work / "config.json").write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "spectrumd", "--config", str(work / "config.json")]
    argv += ["--state-dir", str(state), "--log-level", "info", "--no-machined"]
    if guest_dir:
        argv += ["--guest-dir", guest_dir]
    try:
        with contextlib.ExitStack() as stack:
            address = stack.enter_context(private_bus(work))
            err = stack.enter_context((work / "spectrumd.log").open("w"))
            stack.enter_context(child([*argv, "--bus", address], "spectrumd", stderr=err, cwd=ROOT))
            bus = await MessageBus(bus_address=address).connect()
            try:
                run = Run(bus, state)
                for _ in range(300):
                    with contextlib.suppress(CallFailed):
                        await run.call("ListInstances")
                        break
                    await asyncio.sleep(0.05)
                yield run
                with contextlib.suppress(CallFailed):
                    await run.call("StopAll")
            finally:
                bus.disconnect()
    finally:
        kill_our_vmms(state)
        shutil.rmtree(work, ignore_errors=True)


async def memory_series(image: Path, share: bool, n: int, guest: str | None) -> dict[str, Any]:
    drop_cache(image)
    rows = []
    first_output = 0.0
    async with spectrumd(config(image, share, n), guest) as run:
        pids: list[int] = []
        for k in range(1, n + 1):
            name = f"i{k}"
            t0 = time.monotonic()
            await run.call("StartInstance", "s", name)
            pids.append(await run.pid(name))
            first = await run.wait_line(name, "FIRST")
            if k == 1:
                first_output = first - t0
            await run.wait_line(name, "BOOTED")
            before = host_memory_mib(pids, image)
            await run.wait_line(name, "READ")
            await asyncio.sleep(2.0)  # let the guest settle
            after = host_memory_mib(pids, image)
            rows.append({"n": k, "before": before, "after": after, "read": after - before})
            print(
                f"bench: share_root={share} {k} instance(s): {after:.0f} MiB, "
                f"read added {after - before:.1f} MiB",
                flush=True,
            )
    return {"rows": rows, "first_output": first_output}


async def first_output(image: Path | None, share: bool, guest: str | None) -> float:
    """StartInstance to the FIRST line of one instance (no image: the embedded guest)."""
    if image is not None:
        drop_cache(image)  # as the memory series starts: nothing of the image cached
    async with spectrumd(config(image, share, 1), guest) as run:
        t0 = time.monotonic()
        await run.call("StartInstance", "s", "i1")
        return await run.wait_line("i1", "FIRST") - t0


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def report(series: dict[bool, dict[str, Any]]) -> None:
    print()
    print(f"Host memory of N instances reading the same {BLOB_MIB} MiB from their image")
    print("(sum of the VMMs' PSS outside the image mapping + the image's page cache)\n")
    rows: list[tuple[str, ...]] = [
        ("N", "share_root", "total", "added by N-th", "its read", "read / data", "goal")
    ]
    for share in (False, True):
        prev = None
        for r in series[share]["rows"]:
            ratio = r["read"] / BLOB_MIB
            if share and r["n"] > 1:
                goal = "met" if ratio <= GOAL else "MISSED"
                goal = f"<= {GOAL:.0%}: {goal}"
            else:
                goal = "(first reader fills the cache)" if r["n"] == 1 else "~100 %"
            rows.append(
                (
                    str(r["n"]),
                    "on" if share else "off",
                    f"{r['after']:.0f} MiB",
                    "-" if prev is None else f"{r['after'] - prev:+.0f} MiB",
                    f"{r['read']:+.1f} MiB",
                    f"{ratio:.0%}",
                    goal,
                )
            )
            prev = r["after"]
    table(rows)
    added = {
        s: [b["after"] - a["after"] for a, b in itertools.pairwise(series[s]["rows"])]
        for s in (False, True)
    }
    reads = {s: [r["read"] for r in series[s]["rows"][1:]] for s in (False, True)}
    if added[False] and added[True]:
        off, on = (sum(added[s]) / len(added[s]) for s in (False, True))
        r_off, r_on = (sum(reads[s]) / len(reads[s]) for s in (False, True))
        print(
            f"\nEach added instance costs {off:.0f} MiB without share_root and {on:.0f} MiB "
            f"with it: sharing saves {off - on:.0f} MiB an instance "
            f"({(off - on) / BLOB_MIB:.0%} of the {BLOB_MIB} MiB it reads)."
        )
        print(
            f"Its read alone costs {r_off:.1f} MiB without share_root and {r_on:.1f} MiB "
            f"with it ({r_on / BLOB_MIB:.1%} of the data; noise is a few MiB either way)."
        )


def report_first_output(embedded: float, blk: float, pmem: float) -> None:
    print("\nStartInstance to the application's first output (first instance, TCG)\n")
    table(
        [
            ("guest", "time", "vs embedded"),
            ("embedded (initramfs only)", f"{embedded:.2f} s", "1.00x"),
            ("root image, virtio-blk", f"{blk:.2f} s", f"{blk / embedded:.2f}x"),
            ("root image, virtio-pmem (share_root)", f"{pmem:.2f} s", f"{pmem / embedded:.2f}x"),
        ]
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--guest-dir", default=os.environ.get("SPECTRUMD_GUEST_DIR"))
    ap.add_argument(
        "--only",
        choices=("memory", "first-output"),
        help="run one part (default: both; the memory series gives the images' first output)",
    )
    args = ap.parse_args()
    image = build_image()
    embedded = 0.0 if args.only == "memory" else await first_output(None, False, args.guest_dir)
    if args.only == "first-output":
        blk = await first_output(image, False, args.guest_dir)
        pmem = await first_output(image, True, args.guest_dir)
        report_first_output(embedded, blk, pmem)
        return 0
    series = {}
    for share in (False, True):
        series[share] = await memory_series(image, share, args.instances, args.guest_dir)
    report(series)
    if args.only is None:
        report_first_output(embedded, series[False]["first_output"], series[True]["first_output"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (RuntimeError, CallFailed, subprocess.CalledProcessError) as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
