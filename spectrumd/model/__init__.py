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
    DirectoryResource,
    InstanceDef,
    NetworkResource,
    Resource,
    VmmKind,
)

__all__ = [
    "Accel",
    "Application",
    "Config",
    "DirectoryResource",
    "InstanceDef",
    "NetworkResource",
    "Resource",
    "VmmKind",
    "load_config",
    "load_data_file",
    "parse_config",
    "parse_instance",
    "validate_name",
]
