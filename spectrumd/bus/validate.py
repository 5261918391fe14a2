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
    "restart": frozenset({"s"}),
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


def _typed(
    untrusted_options: Mapping[str, Variant], table: Mapping[str, frozenset[str]]
) -> dict[str, object]:
    """Unwrap an a{sv}: unknown keys and wrong types are refused, naming the key."""
    if len(untrusted_options) > MAX_OPTIONS:
        raise InvalidArgument(f"options: more than {MAX_OPTIONS} entries")
    out: dict[str, object] = {}
    for key, variant in untrusted_options.items():
        allowed = table.get(key)
        if allowed is None:
            known = ", ".join(sorted(table))
            raise InvalidArgument(f'options: unknown option "{key[:64]}" (known: {known})')
        if variant.signature not in allowed:
            raise InvalidArgument(
                f"options.{key}: wrong type {variant.signature!r} "
                f"(expected {' or '.join(sorted(allowed))})"
            )
        out[key] = variant.value
    return out


def options(untrusted_options: Mapping[str, Variant]) -> dict[str, object]:
    """CreateInstance's options."""
    return _typed(untrusted_options, OPTION_SIGNATURES)


GRANT_OPTION_SIGNATURES: dict[str, frozenset[str]] = {
    "access": frozenset({"s"}),
    "lifetime": frozenset({"s"}),
    "expires_at": frozenset({"t", "x"}),
    "duration": frozenset({"t", "u", "i", "x"}),
}


def grant_options(untrusted_options: Mapping[str, Variant], now_us: int) -> tuple[str, str, int]:
    """(access, lifetime, expires_at_us) from Grant/RequestGrant options.

    ``duration`` (seconds) is a shorthand for ``expires_at`` = now + duration;
    either implies lifetime ``until``. Defaults: ``ro``, ``running``.
    """
    values = _typed(untrusted_options, GRANT_OPTION_SIGNATURES)
    if "expires_at" in values and "duration" in values:
        raise InvalidArgument("options: give expires_at or duration, not both")
    expires = 0
    if "duration" in values:
        seconds = int(values["duration"])  # type: ignore[call-overload]
        if not 0 < seconds <= 10 * 365 * 24 * 3600:
            raise InvalidArgument("options.duration: must be 1 second to 10 years")
        expires = now_us + seconds * 1_000_000
    elif "expires_at" in values:
        expires = int(values["expires_at"])  # type: ignore[call-overload]
    default_lifetime = "until" if expires else "running"
    access = str(values.get("access", "ro"))
    lifetime = str(values.get("lifetime", default_lifetime))
    return access, lifetime, expires
