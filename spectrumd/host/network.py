"""Network resources: one bridge per network, one tap per (instance, network).

Instances that hold the same network share its bridge, an isolated layer-2
segment; the host has an address on it only if the resource gives one
(``host_address``). spectrumd routes nothing: traffic crosses networks only
through an instance that is on both.

A bridge exists while at least one tap is on it. A tap is created when an
instance starts (or a network is hot-added) and removed when it stops (or
the network is removed); the daemon keeps its descriptor of each tap for that
time and passes a copy to the VMM. At daemon start, the taps of instances
that a previous run left running (and are re-adopted) are kept, with their
bridges; every other tap and bridge it left (ours by name pattern and alias,
see ``names``) is removed. When the daemon exits it leaves the taps of running
instances in place: their VMMs hold them open.

All netlink and tun work runs in one worker thread (``netns.NetnsThread``),
inside ``--netns`` when given, serialized by one lock on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import attrs

from spectrumd.errors import Busy, Failed, InvalidArgument, InvalidState
from spectrumd.host import names
from spectrumd.host.links import LinkError, Links, NameTaken
from spectrumd.host.netns import NetnsError, NetnsThread
from spectrumd.model.types import NetworkResource

log = logging.getLogger(__name__)

T = TypeVar("T")
SWITCH_INTERVAL = 0.001  # seconds
HostAddress = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@attrs.define(eq=False)
class _Bridge:
    network: str
    name: str
    index: int
    users: set[str] = attrs.Factory(set)


@attrs.define(eq=False)
class Tap:
    """One tap of one instance on one network; ``fd`` is the daemon's descriptor of it
    (-1 for a tap taken back after a daemon restart: its VMM holds it)."""

    instance: str
    network: str
    name: str
    mac: str
    fd: int


def host_address(net: NetworkResource) -> HostAddress | None:
    """The parsed ``host_address`` of ``net``. Raises InvalidArgument naming the resource."""
    if net.host_address is None:
        return None
    try:
        return names.parse_host_address(net.host_address)
    except ValueError as e:
        raise InvalidArgument(f"resources.{net.name}.host_address: {e}") from None


class HostNetworks:
    """The host side of ``network`` resources: bridges and taps, by instance and network.

    An instance's taps can be made between :meth:`begin` and :meth:`end`
    (the supervisor calls them around each run).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._worker = NetnsThread(netns)
        self._links: Links | None = None
        self._lock = asyncio.Lock()
        self._tap_names: names.NameTable[tuple[str, str]] = names.NameTable(
            lambda key, attempt: names.tap_name(key[0], key[1], attempt)
        )
        self._bridge_names: names.NameTable[str] = names.NameTable(names.bridge_name)
        self._bridges: dict[str, _Bridge] = {}
        self._taps: dict[tuple[str, str], Tap] = {}
        # Instances between prepare() and the end of their run.
        self._running: set[str] = set()
        # Called with an instance's name when its interfaces change.
        self.on_change: list[Callable[[str], None]] = []

    @property
    def where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "the host's network namespace"

    # -- daemon ----------------------------------------------------------------

    async def start(self, keep: Collection[str] = (), adopt: Collection[str] = ()) -> None:
        """Start the worker and remove what a previous run left, except the links in
        ``keep`` and the taps (and their bridges) of the instances in ``adopt``.

        Raises Failed (e.g. the namespace does not exist).
        """
        # The worker runs pyroute2's Python code: when the loop's thread wants
        # the GIL back, it waits up to the switch interval (5 ms by default).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.start)
        except NetnsError as e:
            raise Failed(str(e)) from None
        self._links = await self._worker.run(self._make_links)
        if adopt:
            await self._adopt(set(adopt))
        await self.remove_stale(keep)

    async def _adopt(self, instances: set[str]) -> None:
        """Take back the taps of re-adopted instances (their VMMs hold them) and their bridges."""
        links = self._require_links()
        try:
            found = await self._worker.run(links.dump)
        except LinkError as e:
            raise Failed(f"cannot list networks in {self.where}: {e}") from None
        by_index = {link.index: link for link in found}
        for link in found:
            words = names.parse_alias(link.alias)
            if not names.is_owned(link.name, link.alias) or not words or words[0] != "tap":
                continue
            _, instance, network = words
            master = by_index.get(link.master) if link.master is not None else None
            if instance not in instances or master is None:
                continue
            bridge = self._bridges.get(network)
            if bridge is None:
                bridge = _Bridge(network, master.name, master.index)
                self._bridges[network] = bridge
                self._bridge_names.claim(network, master.name)
            bridge.users.add(instance)
            mac = names.mac_address(instance, network)
            # The VMM holds the tap open; the daemon's own descriptor died with it.
            self._taps[(instance, network)] = Tap(instance, network, link.name, mac, -1)
            self._tap_names.claim((instance, network), link.name)
            self._running.add(instance)
            log.info("%s: kept tap %s on network %s", instance, link.name, network)

    @staticmethod
    async def _make_links() -> Links:
        return Links()

    async def remove_stale(self, keep: Collection[str] = ()) -> list[str]:
        """Remove our links that no instance of this run uses; return their names.

        Raises Failed if the links cannot be listed; a link that cannot be
        removed is logged.
        """
        links = self._require_links()
        async with self._lock:
            try:
                found = await self._worker.run(links.dump)
            except LinkError as e:
                raise Failed(f"cannot clean up networks in {self.where}: {e}") from None
            in_use = set(keep) | {t.name for t in self._taps.values()}
            in_use |= {b.name for b in self._bridges.values()}
            stale = [
                link
                for link in found
                if names.is_owned(link.name, link.alias) and link.name not in in_use
            ]
            for link in found:
                if names.OWNED_NAME.fullmatch(link.name) and not names.is_owned(
                    link.name, link.alias
                ):
                    log.warning(
                        "interface %s has spectrumd's name pattern but not its alias; leaving it",
                        link.name,
                    )
            # Taps first: a bridge goes with its ports' links, not the other way round.
            stale.sort(key=lambda link: link.name.startswith(names.BRIDGE_PREFIX))
            removed = []
            for link in stale:
                try:
                    await self._in_worker(functools.partial(links.delete, link.name))
                except LinkError as e:
                    log.error("cannot remove stale %s: %s", link.name, e)
                    continue
                log.info("removed stale %s (%s)", link.name, link.alias)
                removed.append(link.name)
            return removed

    async def close(self) -> None:
        """Stop the worker. Taps of instances that still run stay: their VMMs hold
        them, and the next daemon adopts them; our descriptors close with us."""
        links, self._links = self._links, None
        if links is not None:
            await self._worker.run(self._close_links(links))
        await asyncio.get_running_loop().run_in_executor(None, self._worker.stop)

    @staticmethod
    def _close_links(links: Links) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            links.close()

        return close

    def _require_links(self) -> Links:
        if self._links is None:
            raise Failed("networking is not started")
        return self._links

    # -- runs ----------------------------------------------------------------------

    def begin(self, instance: str) -> None:
        """``instance`` runs (or was taken back after a daemon restart): taps may be made."""
        self._running.add(instance)

    async def end(self, instance: str) -> None:
        """The end of a run: remove every tap of ``instance``. Never raises."""
        await self._release_instance(instance)

    async def add(self, instance: str, net: NetworkResource, what: str) -> Tap:
        """Make a tap (and the network's bridge) for ``instance``; ``what`` starts
        error messages. Raises InvalidState (not begun), InvalidArgument (already on
        it, bad host address), Busy (a name taken by someone else), Failed."""
        host_address(net)
        return await self._add(instance, net, what)

    # -- hot add and remove ----------------------------------------------------

    async def attach(self, instance: str, network: NetworkResource) -> Tap:
        """Make a tap for ``instance`` on ``network`` on a running instance (hot-add).

        The tap is removed by :meth:`detach` or when the instance's run ends.
        Raises InvalidState (not running), InvalidArgument (already on that
        network, bad host address), Busy, Failed.
        """
        tap = await self.add(instance, network, f"cannot attach network {network.name}")
        self.notify(instance)
        return tap

    async def detach(self, instance: str, network: str) -> None:
        """Remove the tap of ``instance`` on ``network``.

        Call after VmmControl.remove_net. Raises InvalidArgument (not on that
        network), Failed.
        """
        async with self._lock:
            tap = self._taps.get((instance, network))
            if tap is None:
                raise InvalidArgument(f"{instance} is not on network {network}")
            try:
                await self._remove_tap(tap)
            except LinkError as e:
                raise Failed(f"cannot detach network {network} from {instance}: {e}") from None
        self.notify(instance)

    def tap(self, instance: str, network: str) -> Tap | None:
        return self._taps.get((instance, network))

    def interfaces(self, instance: str) -> list[tuple[str, str, str]]:
        """(network, tap name, MAC) of each network ``instance`` is on, in the order added."""
        return [(t.network, t.name, t.mac) for t in self._taps.values() if t.instance == instance]

    def bridge_of(self, network: str) -> str | None:
        bridge = self._bridges.get(network)
        return bridge.name if bridge is not None else None

    # -- the work --------------------------------------------------------------

    async def _add(self, instance: str, net: NetworkResource, what: str) -> Tap:
        links = self._require_links()
        key = (instance, net.name)
        async with self._lock:
            # Checked under the lock: the run may have ended while we waited.
            if instance not in self._running:
                raise InvalidState(f"{what} to {instance}: it is not running")
            if key in self._taps:
                raise InvalidArgument(f"{instance} is already on network {net.name}")
            bridge = await self._bridge(net, what)
            tap: Tap | None = None
            try:
                mac = names.mac_address(instance, net.name)
                for other in self._taps.values():
                    if other.network == net.name and other.mac == mac:
                        raise Busy(
                            f"{what}: its MAC {mac} on network {net.name} is also that of "
                            f"{other.instance}"
                        )
                try:
                    name = self._tap_names.allocate(key)
                except names.NamesExhausted:
                    raise Busy(f"{what}: no free tap name for network {net.name}") from None
                alias = names.tap_alias(instance, net.name)
                try:
                    fd = await self._in_worker(
                        lambda: links.create_tap(name, alias, bridge.index),
                        undo=functools.partial(self._undo_tap, links, name),
                    )
                except NameTaken as e:
                    raise Busy(
                        f"{what}: the interface {e.name} exists in {self.where} "
                        "and spectrumd does not own it"
                    ) from None
                except LinkError as e:
                    raise Failed(f"{what}: {e}") from None
                tap = Tap(instance, net.name, name, mac, fd)
                self._taps[key] = tap
                bridge.users.add(instance)
                log.debug("%s: tap %s on bridge %s (%s)", instance, name, bridge.name, mac)
                return tap
            finally:
                if tap is None:
                    self._tap_names.release(key)
                    await self._drop_bridge_if_unused(bridge)

    async def _bridge(self, net: NetworkResource, what: str) -> _Bridge:
        """The network's bridge, made if it does not exist yet. Call with the lock held."""
        bridge = self._bridges.get(net.name)
        if bridge is not None:
            return bridge
        links = self._require_links()
        address = host_address(net)
        try:
            name = self._bridge_names.allocate(net.name)
        except names.NamesExhausted:
            raise Busy(f"{what}: no free bridge name for network {net.name}") from None
        mac, alias = names.bridge_mac(net.name), names.bridge_alias(net.name)
        try:
            index = await self._in_worker(
                lambda: links.create_bridge(name, mac, alias),
                undo=lambda _: links.delete(name),
            )
        except BaseException as e:
            self._bridge_names.release(net.name)
            if isinstance(e, NameTaken):
                raise Busy(
                    f"{what}: the interface {e.name} exists in {self.where} "
                    "and spectrumd does not own it"
                ) from None
            if isinstance(e, LinkError):
                raise Failed(f"{what}: {e}") from None
            raise
        bridge = _Bridge(net.name, name, index)
        self._bridges[net.name] = bridge
        if address is not None:
            try:
                await self._in_worker(lambda: links.add_address(index, name, address))
            except BaseException as e:
                await self._drop_bridge_if_unused(bridge)
                if isinstance(e, LinkError):
                    raise Failed(f"{what}: {e}") from None
                raise
        log.info("network %s: bridge %s%s", net.name, name, f" at {address}" if address else "")
        return bridge

    async def _drop_bridge_if_unused(self, bridge: _Bridge) -> None:
        """Remove the bridge when no tap is on it. Call with the lock held; never raises."""
        if bridge.users or self._bridges.get(bridge.network) is not bridge:
            return
        del self._bridges[bridge.network]
        self._bridge_names.release(bridge.network)
        links = self._require_links()
        try:
            await self._in_worker(lambda: links.delete(bridge.name))
        except LinkError as e:
            log.error("network %s: %s", bridge.network, e)
            return
        log.info("network %s: bridge %s removed", bridge.network, bridge.name)

    async def _remove_tap(self, tap: Tap) -> None:
        """Close and remove one tap, and its bridge if it was the last. Lock held.

        Raises LinkError if the tap could not be removed (it is forgotten anyway).
        """
        links = self._require_links()
        del self._taps[(tap.instance, tap.network)]
        self._tap_names.release((tap.instance, tap.network))
        bridge = self._bridges.get(tap.network)
        if bridge is not None:
            bridge.users.discard(tap.instance)

        async def remove() -> None:
            # Once our fd is closed the tap is gone, unless a VMM still holds it.
            links.close_fd(tap.fd)
            await links.delete(tap.name)

        try:
            await self._in_worker(remove)
        finally:
            if bridge is not None:
                await self._drop_bridge_if_unused(bridge)
        log.debug("%s: tap %s removed", tap.instance, tap.name)

    async def _release_instance(self, instance: str) -> None:
        """The end of a run: remove every tap of ``instance``. Never raises."""
        async with self._lock:
            self._running.discard(instance)
            taps = [t for t in self._taps.values() if t.instance == instance]
            for tap in reversed(taps):
                try:
                    await self._remove_tap(tap)
                except Exception as e:
                    log.error("%s: cannot remove tap %s: %s", instance, tap.name, e)
        if taps:
            self.notify(instance)

    async def _in_worker(
        self,
        fn: Callable[[], Awaitable[T]],
        undo: Callable[[T], Awaitable[object]] | None = None,
    ) -> T:
        """Run ``fn`` in the worker to its end, even if the caller is cancelled.

        A Kill during a start cancels the start; a link the worker made while
        the caller went away is undone by ``undo(result)``, not leaked.
        """
        done = asyncio.ensure_future(self._worker.run(fn))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                result = await done
                if undo is not None:
                    await self._worker.run(functools.partial(undo, result))
            raise

    @staticmethod
    async def _undo_tap(links: Links, name: str, fd: int) -> None:
        links.close_fd(fd)
        await links.delete(name)

    def notify(self, instance: str) -> None:
        for cb in list(self.on_change):
            try:
                cb(instance)
            except Exception:
                log.exception("network change listener failed")
