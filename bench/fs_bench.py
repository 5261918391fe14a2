"""File-system benchmark: ``.venv/bin/python bench/fs_bench.py [--rounds N] [--reps N]``.

One guest (the embedded guest, q35, TCG, 1 vCPU, 256 MiB of shared memfd
RAM, preallocated) is booted with every file server at once, each on its
own device, over the same files on the host:

* ``ours``: spectrumd's own virtio-fs backend (``python -m
  spectrumd.virtiofs``, in Python) on ``vhost-user-fs-pci``, over a
  socketpair (``-chardev socket,fd=N``), confined as the daemon runs it (a
  uid of its own, which owns the files here);
* ``unconfined``: the same backend without its jail, as root, to show what
  the jail costs;
* ``virtiofsd``: QEMU's C virtiofsd (``/usr/lib/qemu/virtiofsd -o
  cache=none``) on the same device (``queue-size=1024`` for both: the
  guest caps a request at queue size - 4 pages);
* ``9p``: QEMU's built-in virtio-9p (``-virtfs local``, msize 512 KiB,
  ``cache=none``). Its kernel modules (``netfs``, ``fscache``, ``9pnet``, ``9p``,
  ``9pnet_virtio``) are not in the embedded guest; they are fetched once from
  the guest's kernel package and appended to the initramfs.

One guest for all: its kernel, its memory and the machine's state are the
same for every server, so the ratios compare servers, not boots (booted
apart, the same server's read varied by 1.6x from boot to boot here). The
files are on a tmpfs of their own, so that no figure depends on the host's
disk or on its writeback of another server's writes. Each server first
reads and writes once, untimed (the first requests after boot are slower).
Then, in each round, every step is run by every server in turn, in an
order that rotates from round to round, with the guest's page cache out of
the way (virtio-fs: ours opens every file FOPEN_DIRECT_IO, virtiofsd runs
with cache=none; 9p mounts with cache=none; and ``drop_caches`` before
each step):

* read: a 192 MiB host file, busybox ``dd bs=1M``;
* write: 192 MiB with ``dd bs=1M conv=notrunc`` over a file of that size
  (one per server), already in memory on the host. The guest's ``sync``
  follows, untimed;
* new file: 192 MiB with ``dd bs=1M`` into a new file, removed after. No
  target: this machine is a VM whose host backs its memory on first touch
  and takes freed memory back within seconds, so each new page costs
  some 3 ms/MiB inside every server's write(2), which sets this figure
  (the step waits 3 s first, so that no server gets the pages the last
  one freed). The write step above measures the transport;
* stat: ``ls -lR`` of 2,000 files;
* create: 500 empty files.

Times come from the guest's ``/proc/timer_list`` clock in nanoseconds,
read by the shell with no fork (0.3 ms under TCG; a ``$(...)`` costs some
10 ms, 10 % of a read). Read and write run ``--reps`` times a round (each
takes a tenth of a second, in which this machine's speed can change by
half). Each figure is the median of its samples, and each ratio the median
of the ratios of samples taken seconds apart (the n-th of each server in
the same round), with the middle half of those ratios. Targets: ours >=
1.0x virtiofsd on every figure but new file, and >= 0.5x 9p on read and
write. Prints a table, and every sample on stderr; exits 1 only if the
benchmark could not run. Everything started here is ended by pid, and the
tmpfs unmounted, on the way out.
"""

from __future__ import annotations

import argparse
import lzma
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.virtiofs.vmharness import Vm, spawn_ours, unused_ids, virtiofs_args  # noqa: E402

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MIB = 1 << 20
BIG_MIB = 192
N_DIRS, N_FILES = 20, 100
N_CREATE = 500
CACHE = Path("/var/cache/spectrumd/bench")
# "unconfined": ours without its jail (as root), to show what the jail costs.
KINDS = ["ours", "unconfined", "virtiofsd", "9p"]
STEPS = ["read", "write", "new", "stat", "create"]
NAMES = ["read MB/s", "write MB/s", "new file MB/s", "stat/s", "create/s"]  # one per step
# Steps run several times a round (--reps): each takes a tenth of a second,
# within which this machine's speed can change by half, so one pair of
# samples a round leaves the median ratio to chance.
REPEATED = ("read", "write")


def per_round(step: str, reps: int) -> int:
    """How many times *step* runs a round; sample r * per_round + i is round r's i-th."""
    return reps if step in REPEATED else 1


# Run in the guest with the servers' mounts made. "step_STEP KIND DIR SAMPLE"
# (STEP one of STEPS, SAMPLE numbered as per_round says) prints one
# "BENCH kind sample step start end [count]" line.
GUEST_SCRIPT = r"""
t() {  # $now: nanoseconds since boot, read with no fork (0.3 ms; a $(...) costs some 10 ms)
  { read -r _; read -r _; read -r _ _ now _; } < /proc/timer_list
  case $now in ''|*[!0-9]*) echo "BENCH-ERR no clock in /proc/timer_list"; now=0 ;; esac
}
dc() { sync; echo 3 > /proc/sys/vm/drop_caches; }
step_read() {
  dc; t; a=$now; dd if=$2/big of=/dev/null bs=1M 2>/dev/null || echo "BENCH-ERR $1 read"; t; b=$now
  echo "BENCH $1 $3 read $a $b"
}
step_write() {
  dc; t; a=$now; dd if=/dev/zero of=$2/out-$1 bs=1M count=192 conv=notrunc 2>/dev/null \
    || echo "BENCH-ERR $1 write"
  t; b=$now; sync; echo "BENCH $1 $3 write $a $b"
}
step_new() {
  dc; sleep 3  # the pages the last new file freed go back to this machine's host (see above)
  t; a=$now; dd if=/dev/zero of=$2/new-$1 bs=1M count=192 2>/dev/null || echo "BENCH-ERR $1 new"
  t; b=$now; sync; echo "BENCH $1 $3 new $a $b $(stat -c %s $2/new-$1)"; rm $2/new-$1
}
step_stat() {
  dc; t; a=$now; n=$(ls -lR $2/tree | grep -c '^-'); t; b=$now
  echo "BENCH $1 $3 stat $a $b $n"
}
step_create() {
  mkdir $2/c-$1-$3 || echo "BENCH-ERR $1 mkdir"
  dc; t; a=$now; i=0
  while [ $i -lt 500 ]; do : > $2/c-$1-$3/f$i || echo "BENCH-ERR $1 create"; i=$((i+1)); done
  t; b=$now; echo "BENCH $1 $3 create $a $b $i"
}
warm() {  # the first requests after boot are slower (cold caches in guest and host): untimed
  dd if=$2/big of=/dev/null bs=1M 2>/dev/null || echo "BENCH-ERR $1 warm"
  dd if=/dev/zero of=$2/out-$1 bs=1M count=192 conv=notrunc 2>/dev/null || echo "BENCH-ERR $1 warm"
}
"""


def make_files(base: Path, kinds: list[str]) -> Path:
    """The files, on a tmpfs of their own (unmounted by the caller) at base/export."""
    export = base / "export"
    export.mkdir(mode=0o777)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g,mode=0777", "fsbench", str(export)],
                   check=True)  # fmt: skip
    chunk = os.urandom(MIB)
    # Read, and overwritten by each server's write step (a file each).
    for name in ["big", *(f"out-{k}" for k in kinds)]:
        with open(export / name, "wb") as f:
            for _ in range(BIG_MIB):
                f.write(chunk)
    tree = export / "tree"
    tree.mkdir(mode=0o755)
    for d in range(N_DIRS):
        sub = tree / f"d{d:02}"
        sub.mkdir(mode=0o755)
        for i in range(N_FILES):
            (sub / f"f{i:03}").write_bytes(b"x" * i)
    return export


# virtio-9p's modules, in load order (Debian 6.1: 9p needs netfs, fscache, 9pnet).
NINEP_MODULES = ("netfs", "fscache", "9pnet", "9p", "9pnet_virtio")


def virtfs_initrd(guest: Path, work: Path) -> Path:
    """The guest's initramfs plus virtio-9p's modules (a second, appended cpio)."""
    kver = (guest / "kernel-version").read_text().split()
    pkg, ver = kver[0], kver[1]
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = {m: CACHE / f"{m}-{ver}.ko" for m in NINEP_MODULES}
    if not all(ko.exists() for ko in cached.values()):
        dl = Path(tempfile.mkdtemp(prefix="fsb-dl.", dir="/tmp"))
        try:
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=dl, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            deb = next(dl.glob("*.deb"))
            wanted = " ".join(f"'*/{m}.ko*'" for m in NINEP_MODULES)
            subprocess.run(
                f"dpkg-deb --fsys-tarfile {deb} | tar -x -C {dl} --wildcards {wanted}",
                shell=True,
                check=True,
            )
            for m, ko in cached.items():
                found = next(dl.rglob(f"{m}.ko*"))
                data = found.read_bytes()
                if found.suffix == ".xz":
                    data = lzma.decompress(data)
                ko.write_bytes(data)
        finally:
            shutil.rmtree(dl, ignore_errors=True)
    root = work / "extra-root"
    (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
    names = ["lib", "lib/modules"]
    for m, ko in cached.items():
        shutil.copy(ko, root / "lib" / "modules" / f"{m}.ko")
        names.append(f"lib/modules/{m}.ko")
    extra = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input="".join(n + "\n" for n in names).encode(),
        capture_output=True,
        check=True,
    ).stdout
    out = work / "initrd-9p.img"
    base = (guest / "initramfs.img").read_bytes()
    # The kernel looks for an uncompressed cpio only at 4-byte offsets and skips zeros.
    out.write_bytes(base + b"\0" * (-len(base) % 4) + extra)
    return out


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("virtiofsd did not create its socket")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User and system time so far of *pid* and its descendants (virtiofsd
    serves from a child in its own namespaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return own + sum(cpu_seconds(k) for k in kids)


def stolen_and_total() -> tuple[int, int]:
    """Clock ticks all CPUs spent so far: stolen by this machine's host
    (a VM's "steal": it wanted to run and did not), and in all."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, inside user]
    return ticks[7], sum(ticks[:8])


def seconds(fields: list[str]) -> float:
    return max(int(fields[1]) - int(fields[0]), 10**6) / 1e9


def figures(
    text: str, kinds: list[str], rounds: int, reps: int
) -> dict[str, dict[str, list[float]]]:
    """Each kind's samples of each figure, from the guest's BENCH lines: the
    same order for every kind, so that the n-th samples of two kinds were
    taken seconds apart. Read and write have *reps* samples a round."""
    got: dict[tuple[str, int, str], list[str]] = {}
    for m in re.finditer(r"BENCH (\S+) (\d+) (\w+) ([\d ]+)", text):
        got[m[1], int(m[2]), m[3]] = m[4].split()
    io = BIG_MIB * MIB / 1e6
    amounts = {"stat": N_DIRS * N_FILES, "create": N_CREATE}  # else MB
    out: dict[str, dict[str, list[float]]] = {}
    for k in kinds:
        mine = out[k] = {n: [] for n in NAMES}
        for step, name in zip(STEPS, NAMES, strict=True):
            amount = amounts.get(step, io)
            for i in range(rounds * per_round(step, reps)):
                if (k, i, step) not in got:
                    raise RuntimeError(f"{k}: sample {i} printed no {step}")
                f = got[k, i, step]
                if step == "stat" and int(f[2]) != N_DIRS * N_FILES:
                    raise RuntimeError(f"{k}: ls -lR saw {f[2]} files, not {N_DIRS * N_FILES}")
                if step == "new" and int(f[2]) != BIG_MIB * MIB:
                    raise RuntimeError(f"{k}: the new file has {f[2]} bytes")
                mine[name].append(amount / seconds(f))
    return out


# Each kind's mount tag ("spectrum": the one the guest's init mounts itself).
TAGS = {"ours": "spectrum", "unconfined": "raw", "virtiofsd": "vfsd", "9p": "bench"}
# Where each kind is mounted in the guest, and the directory its steps use.
MOUNTS = {
    "ours": ("", "/mnt/spectrum/b"),
    "unconfined": (f"mkdir -p /mnt/raw; mount -t virtiofs {TAGS['unconfined']} /mnt/raw",
                   "/mnt/raw/b"),
    "virtiofsd": (f"mkdir -p /mnt/vfsd; mount -t virtiofs {TAGS['virtiofsd']} /mnt/vfsd",
                  "/mnt/vfsd"),
    "9p": (
        "for m in " + " ".join(NINEP_MODULES) + "; do insmod /lib/modules/$m.ko; done; "
        "mkdir -p /mnt/9p; mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,"
        f"cache=none {TAGS['9p']} /mnt/9p",
        "/mnt/9p",
    ),
}  # fmt: skip


def bench(
    kinds: list[str], rounds: int, reps: int, guest: Path, initrd: Path, export: Path, uid: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """One guest with every server in *kinds*; their samples (figures()),
    and the CPU time each server used over the boot."""
    run = Path(tempfile.mkdtemp(prefix="fsb-run.", dir="/tmp"))
    servers: dict[str, subprocess.Popen[bytes]] = {}
    args: list[str] = []
    passed: list[socket.socket] = []
    vm: Vm | None = None
    os.sync()  # nothing dirty from before
    try:
        for kind in kinds:
            if kind == "9p":
                local = f"local,path={export},mount_tag={TAGS[kind]},security_model=none,id=b"
                args += ["-virtfs", local]
            elif kind == "virtiofsd":
                path = run / "vfsd.sock"
                servers[kind] = subprocess.Popen(
                    [VIRTIOFSD, f"--socket-path={path}", "-o", f"source={export}",
                     "-o", "cache=none"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=open(run / "virtiofsd.log", "wb"),  # noqa: SIM115
                )  # fmt: skip
                wait_socket(path, servers[kind])
                args += virtiofs_args(tag=TAGS[kind], path=path, name=kind)
            else:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                passed.append(theirs)
                efd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    jail = (uid, uid) if kind == "ours" else None
                    servers[kind] = spawn_ours(ours.fileno(), [("b", efd, True)], confine=jail)
                finally:
                    os.close(efd)
                    ours.close()
                args += virtiofs_args(theirs.fileno(), TAGS[kind], name=kind)
        vm = Vm(guest, run, args, initrd=initrd, prealloc=True,
                pass_fds=tuple(sock.fileno() for sock in passed))  # fmt: skip
        try:
            vm.start()
        finally:
            for sock in passed:
                sock.close()
        script = [GUEST_SCRIPT]
        script += [f'{MOUNTS[k][0]} || echo "BENCH-ERR mount {k}"' for k in kinds if MOUNTS[k][0]]
        script += [f"warm {k} {MOUNTS[k][1]}" for k in kinds]
        for r in range(rounds):  # each step by every server in turn, in an order that rotates
            turn = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
            for s in STEPS:
                n = per_round(s, reps)
                script += [
                    f"step_{s} {k} {MOUNTS[k][1]} {r * n + i}" for i in range(n) for k in turn
                ]
        script.append("echo BENCH-DONE")
        timeout = 120 + (50 + 5 * reps) * rounds
        text = vm.run_script("\n".join(script) + "\n", "BENCH-DONE", timeout=timeout)
        if "BENCH-ERR" in text:
            raise RuntimeError(f"the guest script failed:\n{text[-3000:]}")
        for k in kinds:
            if k != "9p" and servers[k].poll() is not None:
                raise RuntimeError(f"{k}: the file server exited ({servers[k].returncode})")
        cpu = {k: cpu_seconds(p.pid) for k, p in servers.items()}
        return figures(text, kinds, rounds, reps), cpu
    finally:
        if vm is not None:
            vm.close()
        for p in servers.values():
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--guest-dir",
        type=Path,
        default=Path(os.environ.get("SPECTRUMD_GUEST_DIR", "/var/cache/spectrumd/guest")),
    )
    ap.add_argument("--only", choices=KINDS, action="append")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every step (default 5)")
    ap.add_argument(
        "--reps", type=int, default=4, help="read and write steps in each round (default 4)"
    )
    args = ap.parse_args()
    guest: Path = args.guest_dir
    if not (guest / "vmlinuz").exists():
        print(f"no guest in {guest}: run make guest", file=sys.stderr)
        return 1
    for tool in ("qemu-system-x86_64", VIRTIOFSD, "cpio"):
        if shutil.which(tool) is None:
            print(f"fs_bench needs {tool}", file=sys.stderr)
            return 1
    if args.rounds < 1 or args.reps < 1:
        print("fs_bench: --rounds and --reps must be at least 1", file=sys.stderr)
        return 1
    kinds = [k for k in KINDS if k in (args.only or KINDS)]
    work = Path(tempfile.mkdtemp(prefix="fsb.", dir="/tmp"))
    work.chmod(0o755)
    load = os.getloadavg()[0]
    try:
        export = make_files(work, kinds)
        # Our backend runs confined, as the daemon runs it: as a uid of its own,
        # which owns the tree here (the other servers run as root).
        (uid,) = unused_ids(1)
        for d, dirs, files in os.walk(export):
            for n in [d, *(os.path.join(d, f) for f in dirs + files)]:
                os.chown(n, uid, uid)
        initrd = virtfs_initrd(guest, work)
        t = time.monotonic()
        stolen = stolen_and_total()
        results, cpu = bench(kinds, args.rounds, args.reps, guest, initrd, export, uid)
        for n in NAMES:
            print(f"{n}: " + "; ".join(
                f"{k} " + " ".join(f"{v:.0f}" for v in results[k][n]) for k in kinds
            ), file=sys.stderr)  # fmt: skip
        print(f"one guest, {args.rounds} rounds, in {time.monotonic() - t:.0f} s", file=sys.stderr)
        now = stolen_and_total()
        steal = (now[0] - stolen[0]) / max(1, now[1] - stolen[1])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"fs_bench: {e}", file=sys.stderr)
        return 1
    finally:
        if os.path.ismount(work / "export"):
            subprocess.run(["umount", str(work / "export")], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, load, args.rounds, args.reps)
    print(
        "file server CPU time over the boot (all rounds): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items())
    )
    # This machine is a VM: while its host takes CPU from it, every figure
    # falls and the ratios scatter (see the README).
    print(f"CPU time stolen by this machine's host over the run: {100 * steal:.0f} %")
    return 0


def print_table(
    results: dict[str, dict[str, list[float]]], load: float, rounds: int, reps: int
) -> None:
    kinds = list(results)
    med = {k: {n: statistics.median(results[k][n]) for n in NAMES} for k in kinds}
    head = f"{'':14}" + "".join(f"{k:>11}" for k in kinds)
    print(head + f"{'ours/vfsd':>17}{'ours/9p':>17}  target")
    for n in NAMES:
        row = f"{n:14}" + "".join(f"{med[k][n]:11.1f}" for k in kinds)
        verdicts = []  # one per peer in this run: a target without its peer is not judged
        unjudged = []  # the target's peers not in this run
        for peer, floor in (("virtiofsd", 1.0), ("9p", 0.5)):
            counts = peer == "virtiofsd" or n.endswith("MB/s")
            if "ours" not in results or peer not in results:
                row += f"{'-':>17}"
                if counts:
                    unjudged.append(peer)
                continue
            pairs = zip(results["ours"][n], results[peer][n], strict=True)
            ratios = [a / b for a, b in pairs]
            r = statistics.median(ratios)
            # The middle half of the ratios: one slow moment of the machine
            # is one outlier, not the range.
            lo, _, hi = (
                statistics.quantiles(ratios, n=4, method="inclusive")
                if len(ratios) > 1
                else ratios * 3
            )
            row += f"{r:6.2f} ({lo:.2f}-{hi:.2f})"
            if counts:
                verdicts.append(r >= floor)
        if n == "new file MB/s":  # the host's first touch of memory, not the transport
            print(row + "  none (see the docstring)")
            continue
        target = ">= 1.0x vfsd, 0.5x 9p" if n.endswith("MB/s") else ">= 1.0x vfsd"
        verdict = "not judged" if not verdicts else "ok" if all(verdicts) else "MISSED"
        if verdicts and unjudged:
            verdict += f" ({', '.join(unjudged)} not run)"
        print(row + f"  {target} {verdict}")
    print(
        f"(medians of {rounds} rounds in one guest, every server in each round, read and "
        f"write {reps} times a round; ratios: the median of the ratios of samples taken "
        f"seconds apart (the middle half of them). {BIG_MIB} MiB with dd bs=1M; stat: ls -lR of "
        f"{N_DIRS * N_FILES} files; create: {N_CREATE} empty files; guest page cache off; "
        f"q35, TCG, 1 vCPU; 1-min load at start {load:.2f})"
    )


if __name__ == "__main__":
    sys.exit(main())
