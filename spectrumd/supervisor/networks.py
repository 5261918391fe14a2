"""Network resources as the supervisor uses them: a ResourceDriver over the host's
bridges and taps, and the hot-add and hot-remove of networks on a running VM.

The host part (:class:`~spectrumd.host.network.HostNetworks`) knows taps and
bridges; this part turns them into VM devices (:class:`NetDev`), ties them to
runs, and passes the host's changes on to the layers above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from spectrumd.errors import Failed, InvalidArgument, NoSuchResource, Timeout
from spectrumd.host.network import HostNetworks, Tap, host_address
from spectrumd.model.types import NetworkResource, Resource
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.resources import RunContext
from spectrumd.vmm.base import GuestTimeout, NetDev, VmmControl, VmmError, VmSpec

log = logging.getLogger(__name__)


def netdev(tap: Tap) -> NetDev:
    # The tap name is unique among our taps and a valid QEMU id.
    return NetDev(id=tap.name, tap_fd=tap.fd, tap_name=tap.name, mac=tap.mac)


def network_resource(resources: dict[str, Resource], name: str) -> NetworkResource:
    res = resources.get(name)
    if res is None:
        raise NoSuchResource(f'no resource "{name}"')
    if not isinstance(res, NetworkResource):
        raise InvalidArgument(f'resource "{name}" is a {res.type}, not a network')
    return res


class NetworkService:
    """A ResourceDriver for ``network`` resources."""

    def __init__(self, host: HostNetworks) -> None:
        self.host = host
        # Called with an instance's name when its interfaces change.
        self.on_change: list[Callable[[str], None]] = []
        host.on_change.append(self._changed)

    def _changed(self, instance: str) -> None:
        for cb in list(self.on_change):
            try:
                cb(instance)
            except Exception:
                log.exception("network change listener failed")

    def interfaces(self, instance: str) -> list[tuple[str, str, str]]:
        """(network, tap name, MAC) of each network ``instance`` is on, in the order added."""
        return self.host.interfaces(instance)

    # -- ResourceDriver --------------------------------------------------------

    async def prepare(self, ctx: RunContext) -> None:
        """Make a tap (and bridge) per network of the instance.

        Raises InvalidArgument (bad host address), Busy (an interface of our
        name exists and is not ours; no free name), Failed (netlink or tun).
        Whatever was made is undone by ``ctx.stack``.
        """
        nets = [r for r in ctx.resources if isinstance(r, NetworkResource)]
        for net in nets:
            host_address(net)
        self.host.begin(ctx.name)
        # One undo for every tap the instance will have, hot-added ones too.
        ctx.stack.push_async_callback(self.host.end, ctx.name)
        for net in nets:
            tap = await self.host.add(ctx.name, net, f"cannot start {ctx.name}")
            ctx.nets.append(netdev(tap))
        if nets:
            self.host.notify(ctx.name)

    async def started(self, ctx: RunContext, spec: VmSpec) -> None:
        pass

    async def adopt(self, ctx: RunContext, spec: VmSpec) -> None:
        """A run taken back after a daemon restart: its taps were kept by the host's start."""
        self.host.begin(ctx.name)
        ctx.stack.push_async_callback(self.host.end, ctx.name)
        self.host.notify(ctx.name)

    # -- hot add and remove ------------------------------------------------------

    async def attach(self, inst: Instance, res: NetworkResource) -> None:
        """Give a running instance one more network: a tap, then the VMM's hot-add.

        Raises InvalidState, InvalidArgument (already on it), Busy, Failed,
        Timeout; a hot-add the VMM refuses or does not answer leaves no tap behind.
        """

        async def do(control: VmmControl) -> None:
            tap = await self.host.attach(inst.name, res)
            try:
                await control.add_net(netdev(tap))
            except VmmError as e:
                await self.host.detach(inst.name, res.name)
                raise Failed(f"cannot add network {res.name} to {inst.name}: {e}") from None
            except BaseException:
                # A Timeout (the VMM does not answer) or a cancellation: no tap is left.
                await self.host.detach(inst.name, res.name)
                raise

        await inst.with_control(f"attach network {res.name} to", do)

    async def detach(self, inst: Instance, name: str) -> None:
        """Remove a network from a running instance.

        Raises InvalidState, InvalidArgument, Failed, Timeout.
        """
        if name in inst.definition.resources:
            # Its device sits on the root bus, where QEMU cannot unplug anything.
            raise InvalidArgument(
                f"{name} is in {inst.name}'s definition; only networks added at run time "
                "can be detached (change the configuration and restart instead)"
            )

        async def do(control: VmmControl) -> None:
            tap = self.host.tap(inst.name, name)
            if tap is None:
                raise InvalidArgument(f"{inst.name} is not on network {name}")
            try:
                await control.remove_net(tap.name)
            except GuestTimeout as e:
                # The guest's to answer (a paused one cannot): a named refusal.
                raise Timeout(f"cannot remove network {name} from {inst.name}: {e}") from None
            except VmmError as e:
                raise Failed(f"cannot remove network {name} from {inst.name}: {e}") from None
            await self.host.detach(inst.name, name)

        await inst.with_control(f"detach network {name} from", do)
