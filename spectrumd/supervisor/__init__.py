"""Instances as supervised VMs: the driver around the pure lifecycle table."""

from spectrumd.supervisor.instance import Environment, Instance
from spectrumd.supervisor.manager import Supervisor

__all__ = ["Environment", "Instance", "Supervisor"]
