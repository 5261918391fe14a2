"""Instances as supervised VMs: the driver around the pure lifecycle table."""

from spectrumd.supervisor.env import Environment
from spectrumd.supervisor.instance import Instance
from spectrumd.supervisor.manager import Supervisor

__all__ = ["Environment", "Instance", "Supervisor"]
