"""One error hierarchy for everything a caller may see.

Each class carries the short name used on D-Bus
(``org.spectrum_os.Spectrum1.Error.<name>``); the bus layer maps them in one
place. Messages are written for a person: they name what was wrong.
"""

from __future__ import annotations


class SpectrumError(Exception):
    """Base of every error that is reported to a caller."""

    name = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ClientError(SpectrumError):
    """The caller asked for something wrong (bad argument, wrong state)."""


class InvalidArgument(ClientError):
    name = "InvalidArgument"


class ConfigError(InvalidArgument):
    """A configuration is invalid; ``path`` is the key path, e.g. ``instances.x.application``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class NoSuchInstance(ClientError):
    name = "NoSuchInstance"


class NoSuchApplication(ClientError):
    name = "NoSuchApplication"


class NoSuchResource(ClientError):
    name = "NoSuchResource"


class InvalidState(ClientError):
    name = "InvalidState"


class Exists(ClientError):
    name = "Exists"


class AccessDenied(ClientError):
    name = "AccessDenied"


class Busy(ClientError):
    name = "Busy"


class Timeout(SpectrumError):
    name = "Timeout"


class Cancelled(SpectrumError):
    name = "Cancelled"


class Failed(SpectrumError):
    """Something on the host failed (a VMM that cannot start, a missing binary)."""

    name = "Failed"


ERROR_NAMES: tuple[str, ...] = (
    "NoSuchInstance",
    "NoSuchApplication",
    "NoSuchResource",
    "InvalidState",
    "InvalidArgument",
    "Exists",
    "AccessDenied",
    "Busy",
    "Timeout",
    "Cancelled",
    "Failed",
)
