"""crosvm's command line as upstream defines it (FACTS.md; src/crosvm/cmdline.rs).

Stdlib only: the stand-in ``crosvm`` next to this file imports it, and the
unit tests check every argv the backend builds against it, option by option.
Keys marked "source" are newer than FACTS.md's list and were read in crosvm's
source: ``--serial name=``/``input-unix-stream`` (devices/src/serial_device.rs)
and ``--pci-hotplug-slots`` (pci-hotplug builds).
"""

from __future__ import annotations

import re
from collections.abc import Callable

GLOBAL_VALUE = {"--syslog-tag", "--log-level"}
GLOBAL_SWITCH = {"--extended-status"}
CONTROL = {
    "stop",
    "suspend",
    "resume",
    "powerbtn",
    "balloon",
    "balloon_stats",
    "usb",
    "disk",
    "virtio-net",
}


class GrammarError(ValueError):
    pass


def _bool(v: str | None) -> bool:
    if v in (None, "true"):
        return True
    if v == "false":
        return False
    raise GrammarError(f"{v!r} is not a boolean")


def _abs(v: str) -> str:
    if not v.startswith("/"):
        raise GrammarError(f"{v!r} is not an absolute path")
    return v


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def check(v: str) -> int:
        if not re.fullmatch(r"[0-9]+", v) or not lo <= int(v) <= hi:
            raise GrammarError(f"{v!r} is not an integer in {lo}..{hi}")
        return int(v)

    return check


def _one_of(*values: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if v not in values:
            raise GrammarError(f"{v!r} is not one of {values}")
        return v

    return check


def _mac(v: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", v):
        raise GrammarError(f"{v!r} is not a MAC address")
    return v


def _any(v: str) -> str:
    return v


BOOL = "bool"
# option → (positional first value validator or None, {key: validator or BOOL})
KEYVALUE: dict[str, tuple[Callable[[str], object] | None, dict[str, object]]] = {
    "--block": (
        _abs,
        {"path": _abs, "ro": BOOL, "root": BOOL, "sparse": BOOL, "id": _any, "direct": BOOL},
    ),
    "--pmem": (_abs, {"path": _abs, "ro": BOOL}),
    "--net": (
        None,
        {
            "tap-fd": _int(0, 65535),
            "tap-name": _any,
            "mac": _mac,
            "vq-pairs": _int(1, 256),
            "packed-queue": BOOL,
        },
    ),
    "--wayland-sock": (_abs, {"name": _any}),
    # `--vhost-user TYPE,socket=PATH` (cmdline.rs VhostUserOption); the
    # positional is the device type, kept under "path" like the others.
    "--vhost-user": (_one_of("fs", "block", "net", "vsock", "gpu", "snd"), {"socket": _abs}),
    "--serial": (
        None,
        {
            "type": _one_of("stdout", "file", "unix", "unix-stream", "sink", "syslog"),
            "hardware": _one_of("serial", "virtio-console"),
            "num": _int(1, 4),
            "path": _abs,
            "console": BOOL,
            "earlycon": BOOL,
            "stdin": BOOL,
            "name": _any,  # source
            "input-unix-stream": BOOL,  # source
        },
    ),
}
SIMPLE: dict[str, Callable[[str], object]] = {
    "--initrd": _abs,
    "--params": _any,
    "--socket": _abs,
    "--pci-hotplug-slots": _int(1, 255),  # source
}
SWITCHES = {"--no-balloon", "--disable-sandbox"}
ALIASES = {
    "-i": "--initrd",
    "-p": "--params",
    "-m": "--mem",
    "-c": "--cpus",
    "-s": "--socket",
    "-b": "--block",
}


def parse_kv(option: str, value: str) -> dict[str, object]:
    positional, keys = KEYVALUE[option]
    out: dict[str, object] = {}
    for i, item in enumerate(value.split(",")):
        if "=" not in item and i == 0 and positional is not None:
            out["path"] = positional(item)
            continue
        key, _, v = item.partition("=")
        check = keys.get(key)
        if check is None:
            raise GrammarError(f"{option}: unknown key {key!r}")
        if key in out:
            raise GrammarError(f"{option}: key {key!r} given twice")
        if check == BOOL:
            out[key] = _bool(v if "=" in item else None)
        elif "=" not in item:
            raise GrammarError(f"{option}: {key} needs a value")
        else:
            out[key] = check(v)  # type: ignore[operator]
    return out


def _mem(v: str) -> int:
    return _int(1, 1 << 30)(v.removeprefix("size="))


def _cpus(v: str) -> int:
    return _int(1, 1024)(v.removeprefix("num-cores="))


def parse_run(args: list[str]) -> dict[str, list[object]]:
    """Options of ``crosvm run`` (after ``run``) → {option: [values]}; "kernel": [path]."""
    out: dict[str, list[object]] = {}
    i = 0
    while i < len(args):
        arg = ALIASES.get(args[i], args[i])
        if not arg.startswith("-"):
            if i != len(args) - 1:
                raise GrammarError(f"the kernel must come last, got {arg!r} before {args[i + 1 :]}")
            out["kernel"] = [_abs(arg)]
            break
        if arg in SWITCHES:
            out.setdefault(arg, []).append(True)
            i += 1
            continue
        if i + 1 >= len(args):
            raise GrammarError(f"{arg} needs a value")
        value = args[i + 1]
        if arg == "--mem":
            parsed: object = _mem(value)
        elif arg == "--cpus":
            parsed = _cpus(value)
        elif arg in SIMPLE:
            parsed = SIMPLE[arg](value)
        elif arg in KEYVALUE:
            parsed = parse_kv(arg, value)
        else:
            raise GrammarError(f"unknown option {arg!r}")
        out.setdefault(arg, []).append(parsed)
        i += 2
    if "kernel" not in out:
        raise GrammarError("no kernel given")
    for arg in ("--mem", "--cpus", "--socket", "--initrd"):
        if len(out.get(arg, [])) > 1:
            raise GrammarError(f"{arg} given more than once")
    _check_serials(out.get("--serial", []))
    for net in out.get("--net", []):
        assert isinstance(net, dict)
        if ("tap-fd" in net) == ("tap-name" in net):
            raise GrammarError("--net needs exactly one of tap-fd and tap-name")
    return out


def _check_serials(serials: list[object]) -> None:
    seen = set()
    consoles = 0
    for s in serials:
        assert isinstance(s, dict)
        key = (s.get("hardware", "serial"), s.get("num", 1))
        if key in seen:
            raise GrammarError(f"--serial {key[0]} num={key[1]} given twice")
        seen.add(key)
        consoles += bool(s.get("console"))
        if s.get("type") in ("file", "unix", "unix-stream") and "path" not in s:
            raise GrammarError("--serial: this type needs a path")
        if s.get("input-unix-stream") and s.get("type") != "unix-stream":
            raise GrammarError("--serial: input-unix-stream must be used with type=unix-stream")
    if consoles > 1:
        raise GrammarError("--serial: console given more than once")
