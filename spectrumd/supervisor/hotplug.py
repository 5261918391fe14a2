"""Networks added to and removed from running instances."""

from __future__ import annotations

from spectrumd.errors import Failed, InvalidArgument, NoSuchResource
from spectrumd.host.network import NetworkDriver
from spectrumd.model.types import NetworkResource, Resource
from spectrumd.supervisor.instance import Instance
from spectrumd.vmm.base import VmmControl, VmmError


def network_resource(resources: dict[str, Resource], name: str) -> NetworkResource:
    res = resources.get(name)
    if res is None:
        raise NoSuchResource(f'no resource "{name}"')
    if not isinstance(res, NetworkResource):
        raise InvalidArgument(f'resource "{name}" is a {res.type}, not a network')
    return res


async def attach_network(inst: Instance, network: NetworkDriver, res: NetworkResource) -> None:
    """Give a running instance one more network: a tap, then the VMM's hot-add.

    Raises InvalidState, InvalidArgument (already on it), Busy, Failed; a
    hot-add the VMM refuses leaves no tap behind.
    """

    async def do(control: VmmControl) -> None:
        net = await network.attach(inst.name, res)
        try:
            await control.add_net(net)
        except VmmError as e:
            await network.detach(inst.name, res.name)
            raise Failed(f"cannot add network {res.name} to {inst.name}: {e}") from None
        except BaseException:
            # A Timeout (the VMM does not answer) or a cancellation: no tap is left.
            await network.detach(inst.name, res.name)
            raise

    await inst.with_control(f"attach network {res.name} to", do)


async def detach_network(inst: Instance, network: NetworkDriver, name: str) -> None:
    """Remove a network from a running instance. Raises InvalidState, InvalidArgument, Failed."""

    if name in inst.definition.resources:
        # Its device sits on the root bus, where QEMU cannot unplug anything.
        raise InvalidArgument(
            f"{name} is in {inst.name}'s definition; only networks added at run time "
            "can be detached (change the configuration and restart instead)"
        )

    async def do(control: VmmControl) -> None:
        net = network.netdev(inst.name, name)
        if net is None:
            raise InvalidArgument(f"{inst.name} is not on network {name}")
        try:
            await control.remove_net(net.id)
        except VmmError as e:
            raise Failed(f"cannot remove network {name} from {inst.name}: {e}") from None
        await network.detach(inst.name, name)

    await inst.with_control(f"detach network {name} from", do)
