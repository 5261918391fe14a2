"""``python -m spectrumd.fileserver --control PATH [--user USER]``

The file server runs as its own process so that a bug reachable from a
guest's 9P stream is confined to it, not to the daemon. It binds its
control socket (mode 0600) first and then, with ``--user``, drops every
privilege for good: supplementary groups cleared, then gid, then uid, in
that order because setgid is no longer allowed once the uid is not root.
From then on files are read and created as that user. The daemon (root)
can still connect to the socket it asked for.

``--control-fd N`` serves one already-connected control socket instead
(e.g. one end of a socketpair the daemon passed with ``pass_fds``), and
the process exits when it closes: it cannot outlive its daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import sys

from .control import ControlServer
from .session import DEFAULT_MAX_MSIZE, MIN_MSIZE

logger = logging.getLogger("spectrumd.fileserver")


def _listen(path: str) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def drop_privileges(user: str) -> None:
    """Become *user* for good; raises KeyError or OSError."""
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if pw.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would mean the drop did not stick
            raise OSError("privileges could be regained after dropping them")


def _raise_fd_limit() -> None:
    # Every fid holds an fd; let the per-session fid cap, not the default
    # soft limit of 1024, be what bounds a guest.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _accept_loop(server: ControlServer, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    clients: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        task = loop.create_task(server.run_client(conn))
        clients.add(task)
        task.add_done_callback(clients.discard)


async def _main(
    server: ControlServer, listener: socket.socket | None, conn: socket.socket | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if listener is not None:
        work = loop.create_task(_accept_loop(server, listener))
    else:
        assert conn is not None
        work = loop.create_task(server.run_client(conn))
    stopper = loop.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stopper):
            task.cancel()
        await asyncio.gather(work, stopper, return_exceptions=True)
        await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectrumd.fileserver")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--control", metavar="SOCKET_PATH", help="listen here for the daemon")
    where.add_argument("--control-fd", type=int, metavar="FD", help="an inherited control socket")
    parser.add_argument("--user", help="drop privileges to this user after binding")
    parser.add_argument("--max-msize", type=int, default=DEFAULT_MAX_MSIZE)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if not os.path.isdir("/proc/self/fd"):
        # Reopening an inode already checked by fstat goes through
        # /proc/self/fd (see resolve.reopen); without it files cannot be
        # opened safely.
        logger.error("/proc is not mounted; refusing to start")
        return 1
    if args.max_msize < MIN_MSIZE:
        parser.error(f"--max-msize must be at least {MIN_MSIZE}")
    _raise_fd_limit()
    listener = conn = None
    try:
        if args.control is not None:
            listener = _listen(args.control)
        else:
            conn = socket.socket(fileno=args.control_fd)
        if args.user:
            drop_privileges(args.user)
    except (OSError, KeyError) as e:
        logger.error("cannot start: %s", e)
        return 1
    server = ControlServer(max_msize=args.max_msize)
    asyncio.run(_main(server, listener, conn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
