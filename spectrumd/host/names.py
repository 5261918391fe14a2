"""Names and addresses of the links spectrumd makes, as pure functions.

Every link the daemon makes has a name of a fixed pattern (``spt`` + 12 hex
digits for a tap, ``spb`` + 12 hex digits for a bridge: 15 characters, the
most a Linux interface name may have) and an alias (``ip link`` shows it)
that starts with ``spectrumd``. Both together mark a link as the daemon's:
a link that has the name pattern but not the alias belongs to someone else
and is never touched.

The hex digits are a hash of (instance, network) for a tap and of the network
for a bridge, so a name is the same on every run. Two keys whose names
collide are told apart by an attempt counter that is hashed in too
(:class:`NameTable`); with 48 bits that is for correctness, not for use.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

IFNAMSIZ = 15  # bytes, without the NUL
TAP_PREFIX = "spt"
BRIDGE_PREFIX = "spb"
ALIAS_PREFIX = "spectrumd "
_HEX_DIGITS = IFNAMSIZ - len(TAP_PREFIX)
OWNED_NAME = re.compile(rf"sp[tb][0-9a-f]{{{_HEX_DIGITS}}}")
# How many names a key may try before the table gives up.
ATTEMPTS = 8

K = TypeVar("K", bound=Hashable)


def _digest(*parts: str) -> bytes:
    # Names match [a-z0-9-], so a NUL separator makes the encoding unambiguous.
    return hashlib.sha256("\0".join(parts).encode()).digest()


def tap_name(instance: str, network: str, attempt: int = 0) -> str:
    return TAP_PREFIX + _digest("tap", instance, network, str(attempt)).hex()[:_HEX_DIGITS]


def bridge_name(network: str, attempt: int = 0) -> str:
    return BRIDGE_PREFIX + _digest("bridge", network, str(attempt)).hex()[:_HEX_DIGITS]


def _mac(digest: bytes) -> str:
    # 0x02 in the first octet: locally administered, unicast.
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def mac_address(instance: str, network: str) -> str:
    """The guest's MAC on ``network``: ``02:`` and 40 bits of a hash."""
    return _mac(_digest("mac", instance, network))


def bridge_mac(network: str) -> str:
    """The bridge's own MAC (fixed, so it does not change as ports come and go)."""
    return _mac(_digest("bridge-mac", network))


def tap_alias(instance: str, network: str) -> str:
    return f"{ALIAS_PREFIX}tap {instance} {network}"


def bridge_alias(network: str) -> str:
    return f"{ALIAS_PREFIX}bridge {network}"


def parse_alias(alias: str | None) -> tuple[str, ...] | None:
    """("tap", INSTANCE, NETWORK) or ("bridge", NETWORK) from our alias; None otherwise."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    words = tuple(alias[len(ALIAS_PREFIX) :].split(" "))
    if (words[0] == "tap" and len(words) == 3) or (words[0] == "bridge" and len(words) == 2):
        return words
    return None


def is_owned(name: str, alias: str | None) -> bool:
    """True for a link spectrumd made: our name pattern and our alias."""
    return OWNED_NAME.fullmatch(name) is not None and (alias or "").startswith(ALIAS_PREFIX)


def parse_host_address(
    value: str,
) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """``10.0.0.1/24`` → an interface address. Raises ValueError saying what is wrong."""
    if "/" not in value:
        raise ValueError(f"{value!r} needs a prefix length, e.g. 10.0.0.1/24")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address with a prefix length") from None


class NamesExhausted(Exception):
    """Every name a key may have is taken by another key."""


class NameTable(Generic[K]):
    """Names in use, by key; a key gets the first of its candidates no other key holds."""

    def __init__(self, candidate: Callable[[K, int], str], attempts: int = ATTEMPTS) -> None:
        self._candidate = candidate
        self._attempts = attempts
        self._by_name: dict[str, K] = {}
        self._by_key: dict[K, str] = {}

    def allocate(self, key: K) -> str:
        """The key's name (the same one while it holds it). Raises NamesExhausted."""
        if key in self._by_key:
            return self._by_key[key]
        for attempt in range(self._attempts):
            name = self._candidate(key, attempt)
            if name not in self._by_name:
                self._by_name[name] = key
                self._by_key[key] = name
                return name
        raise NamesExhausted(f"all {self._attempts} names for {key!r} are in use")

    def claim(self, key: K, name: str) -> None:
        """Record that ``key`` already holds ``name`` (a link kept from an earlier run)."""
        self._by_name[name] = key
        self._by_key[key] = name

    def release(self, key: K) -> None:
        name = self._by_key.pop(key, None)
        if name is not None:
            del self._by_name[name]

    def name_of(self, key: K) -> str | None:
        return self._by_key.get(key)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_key)
