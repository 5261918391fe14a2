"""The data model: applications, resources, instances, and their validation."""

from spectrumd.model.config import (
    Config,
    load_config,
    load_data_file,
    parse_config,
    parse_instance,
    validate_name,
)
from spectrumd.model.types import (
    Accel,
    Application,
    Arch,
    DirectoryResource,
    Disk,
    InstanceDef,
    NetworkResource,
    Resource,
    UsbResource,
    VmmKind,
    WaylandResource,
)

__all__ = [
    "Accel",
    "Application",
    "Arch",
    "Config",
    "DirectoryResource",
    "Disk",
    "InstanceDef",
    "NetworkResource",
    "Resource",
    "UsbResource",
    "VmmKind",
    "WaylandResource",
    "load_config",
    "load_data_file",
    "parse_config",
    "parse_instance",
    "validate_name",
]
