"""``python -m spectrumd.virtiofs``: the virtio-fs backend of one instance.

::

    python -m spectrumd.virtiofs (--vhost-fd FD | --vhost-listen-fd FD | --fuse-fd FD)
        [--control-fd FD | --control-listen-fd FD] [--export NAME=FD[:rw|:ro]]...
        [--confine UID:GID] [--tag TAG] [--request-queues N] [--max-inodes N]
        [--max-handles N] [--entry-timeout S] [--root-entry-timeout S]
        [--attr-timeout S] [--max-pages N] [--poll-max-us US] [--log-level LEVEL]

One process per instance. It is given descriptors only and opens no path
(but /proc/self/fd, through which checked inodes are reopened):

* ``--vhost-fd``: a connected stream socket whose other end is the VMM's
  vhost-user chardev (``-chardev socket,id=fs,fd=N``);
* ``--vhost-listen-fd``: instead, a listening stream socket (the VMM
  connects to a path the daemon bound, as crosvm does): exactly one
  connection is accepted, then the listener is closed;
* ``--fuse-fd``: instead, a /dev/fuse fd already mounted (tests);
* ``--control-fd``: a connected stream socket for live export changes
  (control.py), served until EOF;
* ``--control-listen-fd``: instead, a listening stream socket: the daemon
  connects, and connects again after its own restart (a new connection
  replaces the open one); the guest is served throughout;
* ``--export NAME=FD[:rw]``: an initial export, a directory fd (read-only
  unless ``:rw``);
* ``--confine UID:GID``: once every initial fd is in hand, and before any
  request is served, confine the process for good (jail.py): its own
  mount, network and IPC namespaces with an empty root, that uid and gid
  with no groups, no new privileges, a seccomp filter. The initial exports
  are first turned into detached mounts (jail.detach); exports added later
  must come that way from the daemon. A confinement that fails logs
  ``cannot confine: REASON`` and exits 1 before serving.

Everything runs in one thread around epoll(7) (poll(2) for FUSE):
vhost-user messages, control commands and queue kicks are handled in
turn, so an export change never races a request. After a kick a
companion process keeps a CPU awake a little, at idle priority, while the
loop sleeps (spin.py, ``--poll-max-us``; forked before the jail, it enters
its own), unless the loop has lately waited for a CPU (another task wants
it: no CPU goes idle); in that time the loop also warms the CPU's caches
with the block a sequential read or write will most likely ask for next
(warm.py). The process exits when the VMM closes its end of the
vhost-user socket (or the FUSE file system is unmounted), and its
companion with it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

from . import jail
from .control import ControlServer, recv_with_fds
from .device import Device, fs_config
from .fusedev import serve_fd
from .ops import DEFAULT_ATTR_TIMEOUT, DEFAULT_ENTRY_TIMEOUT, FileSystem
from .spin import DEFAULT_POLL_MAX_US, KeepAwake, RunDelay, Spin
from .tree import ExportError, Tree
from .vhost import HEADER, MAX_PAYLOAD, Backend, VhostError

KICK_EVENTS = select.EPOLLIN | select.EPOLLET

logger = logging.getLogger("spectrumd.virtiofs")


def recv_message(sock: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
    """One vhost-user message, or None at EOF. Raises VhostError or OSError."""
    data, fds = recv_with_fds(sock, HEADER.size)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    try:
        while len(data) < HEADER.size:
            more = sock.recv(HEADER.size - len(data))
            if not more:
                raise VhostError("EOF inside a message header")
            data += more
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise VhostError(f"payload of {size} bytes")
        payload = b""
        while len(payload) < size:
            more = sock.recv(size - len(payload))
            if not more:
                raise VhostError("EOF inside a message payload")
            payload += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, flags, payload, fds


def serve_vhost(
    backend: Backend,
    sock: socket.socket | None,
    control: socket.socket | None = None,
    *,
    listener: socket.socket | None = None,
    control_listener: socket.socket | None = None,
    poll_max: float = 0.0,
    awake: KeepAwake | None = None,
) -> None:
    """Run until the VMM hangs up. Raises VhostError on a message we cannot use.

    Without *sock*, the VMM's one connection is accepted on *listener*
    first; control commands are served while it has not come yet. After a
    kick *awake* keeps a CPU awake for up to *poll_max* seconds (spin.py).
    """
    device = backend.device
    # epoll, so that the kick eventfds can be edge-triggered: a kick is then
    # a wake-up with no read(2) of the counter (the queue is emptied anyway).
    poller = select.epoll()
    if sock is not None:
        poller.register(sock.fileno(), select.POLLIN)
    elif listener is not None:
        poller.register(listener.fileno(), select.POLLIN)
    else:
        raise ValueError("serve_vhost needs a socket or a listener")
    ctl = ControlServer(
        device.fs.tree,
        poller,
        listener=control_listener,
        conn=control,
        settle=device.fs.attr_timeout,
    )
    kicks: dict[int, int] = {}  # kick fd → queue index
    accepted: socket.socket | None = None  # ours to close, unlike a given *sock*

    def refresh_kicks() -> None:
        want = {vq.kick_fd: vq.index for vq in device.queues if vq.kick_fd >= 0}
        for fd in set(kicks) - set(want):
            with contextlib.suppress(OSError):  # closed already: epoll forgot it then
                poller.unregister(fd)
        for fd in want:
            # A kick fd replaced by a new one of the same number is a new
            # file to epoll (the old one left its set when it was closed).
            try:
                poller.modify(fd, KICK_EVENTS)
            except FileNotFoundError:
                poller.register(fd, KICK_EVENTS)
        kicks.clear()
        kicks.update(want)

    spin = Spin(poll_max)
    waits = RunDelay(enabled=poll_max > 0)  # no read per kick where nothing polls
    warmer = device.warmer
    try:
        while True:
            until = spin.deadline()
            if until is not None and awake is not None:
                awake.until(until)
            if warmer.plan is not None:
                events = poller.poll(0)
                if not events:
                    warmer.step()  # a chunk of the next block, then a look for kicks
                    continue
            else:
                events = poller.poll()
            for fd, _ev in events:
                if sock is not None and fd == sock.fileno():
                    msg = recv_message(sock)
                    if msg is None:
                        return
                    reply = backend.handle(*msg)
                    if reply is not None:
                        sock.sendall(reply)
                    refresh_kicks()
                elif listener is not None and fd == listener.fileno():
                    sock, _ = listener.accept()
                    sock.setblocking(True)  # as an inherited --vhost-fd is
                    accepted = sock
                    poller.unregister(fd)
                    listener.close()
                    listener = None
                    poller.register(sock.fileno(), select.POLLIN)
                elif fd in kicks:
                    now = time.monotonic()
                    answered = device.process(device.queues[kicks[fd]])
                    # Learning from the kick (run_delay is a procfs read)
                    # waits until the guest has its replies.
                    spin.kicked(now, waits.since_last())
                    if answered:
                        spin.served(time.monotonic())
                    if poll_max <= 0 or spin.shared(now):
                        warmer.cancel()  # warm only where the loop would poll
                else:
                    ctl.handle(fd)
    finally:
        waits.close()
        ctl.close()
        poller.close()
        if accepted is not None:
            accepted.close()


def _ids(spec: str) -> tuple[int, int]:
    uid, sep, gid = spec.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError(f"{spec!r} is not UID:GID (two numbers)")
    return int(uid), int(gid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spectrumd.virtiofs")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--vhost-fd", type=int, metavar="FD")
    where.add_argument("--vhost-listen-fd", type=int, metavar="FD")
    where.add_argument("--fuse-fd", type=int, metavar="FD")
    ctl_where = ap.add_mutually_exclusive_group()
    ctl_where.add_argument("--control-fd", type=int, metavar="FD")
    ctl_where.add_argument("--control-listen-fd", type=int, metavar="FD")
    ap.add_argument("--export", action="append", default=[], metavar="NAME=FD[:rw]")
    ap.add_argument("--tag", default="spectrum")
    ap.add_argument("--request-queues", type=int, default=1)
    ap.add_argument("--max-inodes", type=int, default=1 << 16)
    ap.add_argument("--max-handles", type=int, default=1 << 12)
    ap.add_argument("--entry-timeout", type=float, default=DEFAULT_ENTRY_TIMEOUT, metavar="SECONDS")
    # Above 0, a removed export's name answers EIO instead of ENOENT for that
    # long, and a re-added one is unreachable for that long (its old dentry).
    ap.add_argument("--root-entry-timeout", type=float, default=0.0, metavar="SECONDS")
    # How long the guest may keep attributes (see ops.py): a removed export's
    # attributes the guest already holds are shown (never used) for that long.
    ap.add_argument("--attr-timeout", type=float, default=DEFAULT_ATTR_TIMEOUT, metavar="SECONDS")
    # Pages per READ/WRITE: at most 256 (1 MiB), the kernel's limit.
    ap.add_argument("--max-pages", type=int, default=256)
    # The longest a CPU is kept awake after a kick (spin.py); 0: never, no companion.
    ap.add_argument("--poll-max-us", type=int, default=DEFAULT_POLL_MAX_US, metavar="US")
    ap.add_argument("--confine", type=_ids, metavar="UID:GID")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # SIGTERM unwinds like an exit (finally blocks run, profiles are written).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.umask(0)  # the guest's mode bits (the kernel applied its umask) are kept as given
    tree = Tree(max_inodes=args.max_inodes, max_handles=args.max_handles)
    tree.sealed = args.confine is not None
    try:
        for spec in args.export:
            name, _, rest = spec.partition("=")
            fd_s, _, mode = rest.partition(":")
            if mode not in ("", "ro", "rw"):
                ap.error(f"--export {spec}: mode must be ro or rw")
            fd = int(fd_s)
            if args.confine is not None:
                fd = _detached(fd, mode == "rw")
            tree.add_export(name, fd, mode == "rw")
    except (ExportError, ValueError, OSError) as e:
        logger.error("cannot start: %s", e)
        return 1
    awake = None
    if args.fuse_fd is None and args.poll_max_us > 0:
        # Forked before the jail, which allows no fork; it enters its own.
        confine = None if args.confine is None else functools.partial(jail.enter, *args.confine)
        awake = KeepAwake.start(confine)
    if args.confine is not None:
        try:
            jail.enter(*args.confine)
        except OSError as e:  # each names its step in strerror
            logger.error("cannot confine: %s", e.strerror or e)
            return 1
        logger.debug("confined to %d:%d", *args.confine)
    fs = FileSystem(
        tree, args.entry_timeout, args.max_pages, args.root_entry_timeout, args.attr_timeout
    )
    control = control_listener = None
    if args.control_fd is not None:
        control = socket.socket(fileno=args.control_fd)
    if args.control_listen_fd is not None:
        control_listener = socket.socket(fileno=args.control_listen_fd)
    try:
        if args.fuse_fd is not None:
            serve_fd(args.fuse_fd, fs, control, control_listener=control_listener)
            return 0
        config = fs_config(args.tag, args.request_queues)
        backend = Backend(Device(fs, 1 + args.request_queues), config)
        sock = listener = None
        if args.vhost_fd is not None:
            sock = socket.socket(fileno=args.vhost_fd)
        else:
            listener = socket.socket(fileno=args.vhost_listen_fd)
        try:
            serve_vhost(
                backend,
                sock,
                control,
                listener=listener,
                control_listener=control_listener,
                poll_max=max(0, args.poll_max_us) / 1e6,
                awake=awake,
            )
        except (VhostError, OSError, struct.error) as e:
            logger.error("vhost-user connection failed: %s", e)
            return 1
        logger.info("the VMM closed the vhost-user connection")
        logger.debug("requests by opcode: %s", dict(backend.device.counts.most_common()))
        logger.debug("warmed %d bytes", backend.device.warmer.warmed)
        for vq in backend.device.queues:
            logger.debug(
                "queue %d: parsed tables reused %d times, parsed anew %d",
                vq.index, vq.table_hits, vq.table_misses,
            )  # fmt: skip
        return 0
    finally:
        # A SIGTERM from here on just ends the process (no SystemExit mid-teardown).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if awake is not None:
            awake.close()
        tree.close()


def _detached(fd: int, writable: bool) -> int:
    """A detached mount of the directory *fd* in its place (the original is closed)."""
    try:
        return jail.detach(fd, writable)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
