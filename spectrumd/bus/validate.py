"""Validation of untrusted D-Bus arguments, in one place.

D-Bus has already checked the types against the signature; this checks the
values. Names follow the configuration's rule; lists and dicts are bounded.
"""

from collections.abc import Mapping

from dbus_fast import Variant

from spectrumd.errors import ConfigError, InvalidArgument
from spectrumd.model.config import validate_name

MAX_RESOURCES = 64
MAX_OPTIONS = 16
MAX_STRING = 4096

# a{sv} option → the D-Bus signatures accepted for it.
OPTION_SIGNATURES: dict[str, frozenset[str]] = {
    "vmm": frozenset({"s"}),
    "accel": frozenset({"s"}),
    "stop_timeout": frozenset({"d", "u", "i", "t", "x"}),
}


def name(what: str, untrusted_name: str) -> str:
    try:
        return validate_name(what, untrusted_name)
    except ConfigError as e:
        raise InvalidArgument(e.message) from None


def string(what: str, untrusted_value: str) -> str:
    if len(untrusted_value) > MAX_STRING:
        raise InvalidArgument(f"{what}: longer than {MAX_STRING} characters")
    return untrusted_value


def names(what: str, untrusted_names: list[str]) -> list[str]:
    if len(untrusted_names) > MAX_RESOURCES:
        raise InvalidArgument(f"{what}: more than {MAX_RESOURCES} entries")
    return [name(f"{what}[{i}]", n) for i, n in enumerate(untrusted_names)]


def options(untrusted_options: Mapping[str, Variant]) -> dict[str, object]:
    """Unwrap an a{sv} of known options; unknown keys and wrong types are refused."""
    if len(untrusted_options) > MAX_OPTIONS:
        raise InvalidArgument(f"options: more than {MAX_OPTIONS} entries")
    out: dict[str, object] = {}
    for key, variant in untrusted_options.items():
        allowed = OPTION_SIGNATURES.get(key)
        if allowed is None:
            known = ", ".join(sorted(OPTION_SIGNATURES))
            raise InvalidArgument(f'options: unknown option "{key[:64]}" (known: {known})')
        if variant.signature not in allowed:
            raise InvalidArgument(
                f"options.{key}: wrong type {variant.signature!r} "
                f"(expected {' or '.join(sorted(allowed))})"
            )
        out[key] = variant.value
    return out
