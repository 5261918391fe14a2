"""Loading and validating the JSON configuration (the form the Nix side emits).

Every error is a :class:`ConfigError` whose path names the offending key, e.g.
``instances.work-shell.application: no application "shel"``. Validation is
pure: it reads the parsed JSON and returns immutable values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from spectrumd.errors import ConfigError
from spectrumd.model.image import ImageError, probe_image
from spectrumd.model.types import (
    RESOURCE_TYPES,
    Accel,
    Application,
    Arch,
    DirectoryResource,
    Disk,
    InstanceDef,
    NetworkResource,
    Resource,
    Restart,
    UsbResource,
    VmmKind,
    WaylandResource,
)

_E = TypeVar("_E", VmmKind, Accel, Arch, Restart)

NAME_RULE = "[a-z0-9][a-z0-9-]{0,62}"
_NAME_RE = re.compile(NAME_RULE)
MAX_COMMAND = 64 * 1024
MAX_DISKS = 16
_USB_ID_RE = re.compile("[0-9a-f]{4}")
_USB_SERIAL_RE = re.compile("[\x21-\x7e]{1,126}")
DEFAULT_STOP_TIMEOUT = 30.0


def shown(untrusted: object, limit: int = 80) -> str:
    """*untrusted* as JSON for a message, its text cut to *limit* characters,
    escapes counted whole (a character outside the BMP is 12 of them): a
    longer one keeps ``limit - 3`` and ends in "..." (as nix/check.nix cuts)."""
    if not isinstance(untrusted, str):
        text = json.dumps(untrusted)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    pieces = [json.dumps(ch)[1:-1] for ch in untrusted[: limit + 1]]
    if sum(map(len, pieces)) <= limit and len(untrusted) <= limit:
        return '"' + "".join(pieces) + '"'
    out, used = [], 0
    for piece in pieces:
        if used + len(piece) > limit - 3:
            break
        out.append(piece)
        used += len(piece)
    return '"' + "".join(out) + '..."'


def validate_name(path: str, untrusted_name: object) -> str:
    """Return the name if it follows :data:`NAME_RULE`, else raise ConfigError."""
    if not isinstance(untrusted_name, str):
        raise ConfigError(path, f"a name must be a string, not {_json_type(untrusted_name)}")
    if not _NAME_RE.fullmatch(untrusted_name):
        raise ConfigError(
            path, f"invalid name {shown(untrusted_name)}: names must match {NAME_RULE}"
        )
    return untrusted_name


@attrs.frozen
class Defaults:
    # Resolved: when the file has no defaults.vmm (vmm_auto), this is what
    # resolve_auto_vmm chose at daemon start.
    vmm: VmmKind = VmmKind.qemu
    accel: Accel = Accel.kvm
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    vmm_auto: bool = False
    restart: Restart = Restart.no


def resolve_auto_vmm(crosvm_available: bool) -> VmmKind:
    """What an absent ``defaults.vmm`` means: crosvm where its binary is found, else QEMU."""
    return VmmKind.crosvm if crosvm_available else VmmKind.qemu


@attrs.frozen
class Config:
    defaults: Defaults
    applications: Mapping[str, Application]
    resources: Mapping[str, Resource]
    instances: Mapping[str, InstanceDef]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Obj:
    """Typed access to one JSON object; remembers which keys were read."""

    def __init__(self, path: str, value: object) -> None:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected an object, got {_json_type(value)}")
        self.path = path
        self.value: dict[str, Any] = value
        self.seen: set[str] = set()

    def _get(self, key: str, required: bool) -> object:
        """The value at ``key``; an explicit null counts as not given."""
        self.seen.add(key)
        value = self.value.get(key)
        if value is None and required:
            raise ConfigError(_join(self.path, key), "missing")
        return value

    def string(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        v = self._get(key, required)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ConfigError(_join(self.path, key), f"expected a string, got {_json_type(v)}")
        if "\0" in v:
            raise ConfigError(_join(self.path, key), "must not contain NUL")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self._get(key, False)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(_join(self.path, key), f"expected an integer, got {_json_type(v)}")
        if not lo <= v <= hi:
            raise ConfigError(_join(self.path, key), f"{v} is out of range {lo}..{hi}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key, False)
        if v is None:
            return default
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ConfigError(_join(self.path, key), f"expected a number, got {_json_type(v)}")
        if not lo <= v <= hi:
            raise ConfigError(_join(self.path, key), f"{v} is out of range {lo}..{hi}")
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(_join(self.path, key), f"expected true or false, got {_json_type(v)}")
        return v

    def obj(self, key: str) -> _Obj:
        v = self._get(key, False)
        return _Obj(_join(self.path, key), {} if v is None else v)

    def abspath(self, key: str, *, required: bool = False) -> Path | None:
        v = self.string(key, required=required)
        if v is None:
            return None
        where = _join(self.path, key)
        if not v.startswith("/"):
            raise ConfigError(where, f"{shown(v)} is not an absolute path")
        parts = v.split("/")
        if any(p in (".", "..") for p in parts) or "//" in v or (len(v) > 1 and v.endswith("/")):
            raise ConfigError(where, f"{shown(v)} is not a canonical path")
        return Path(v)

    def enum(self, key: str, kind: type[_E], default: _E) -> _E:
        v = self.string(key)
        if v is None:
            return default
        try:
            return kind(v)
        except ValueError:
            allowed = " or ".join(json.dumps(m.value) for m in kind)
            raise ConfigError(_join(self.path, key), f"{shown(v)} is not {allowed}") from None

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise ConfigError(_join(self.path, unknown[0]), "unknown key")


def _parse_defaults(o: _Obj, auto_vmm: VmmKind) -> Defaults:
    d = Defaults(
        vmm=o.enum("vmm", VmmKind, auto_vmm),
        accel=o.enum("accel", Accel, Accel.kvm),
        stop_timeout=o.number("stop_timeout", DEFAULT_STOP_TIMEOUT, 0.0, 3600.0),
        vmm_auto="vmm" not in o.value,
        restart=o.enum("restart", Restart, Restart.no),
    )
    o.done()
    return d


def _parse_application(name: str, o: _Obj) -> Application:
    command = o.string("command", required=True)
    assert command is not None
    if len(command.encode()) > MAX_COMMAND:
        raise ConfigError(_join(o.path, "command"), f"longer than {MAX_COMMAND} bytes")
    app = Application(
        name=name,
        command=command,
        memory_mib=o.integer("memory_mib", 256, 64, 1024 * 1024),
        vcpus=o.integer("vcpus", 1, 1, 256),
        kernel=o.abspath("kernel"),
        initrd=o.abspath("initrd"),
        params=o.string("params", default="") or "",
        arch=o.enum("arch", Arch, Arch.x86_64),
        root_image=o.abspath("root_image"),
        share_root=o.boolean("share_root", False),
        disks=_parse_disks(o),
    )
    if app.share_root and app.root_image is None:
        raise ConfigError(_join(o.path, "share_root"), "needs a root_image to share")
    _check_root_image(o, app)
    if app.initrd is not None and app.kernel is None:
        raise ConfigError(_join(o.path, "initrd"), "an initrd needs a kernel")
    o.done()
    return app


def _parse_disks(o: _Obj) -> tuple[Disk, ...]:
    raw = o._get("disks", False)
    if raw is None:
        return ()
    where = _join(o.path, "disks")
    if not isinstance(raw, list):
        raise ConfigError(where, f"expected a list, got {_json_type(raw)}")
    if len(raw) > MAX_DISKS:
        raise ConfigError(where, f"more than {MAX_DISKS} disks")
    disks: list[Disk] = []
    for i, item in enumerate(raw):
        d = _Obj(f"{where}[{i}]", item)
        path = d.abspath("path", required=True)
        assert path is not None
        disk = Disk(
            path=path, writable=d.boolean("writable", False), overlay=d.boolean("overlay", False)
        )
        if disk.overlay and not disk.writable:
            raise ConfigError(_join(d.path, "overlay"), "an overlay disk must be writable")
        if disk.overlay and any(x.overlay for x in disks):
            raise ConfigError(_join(d.path, "overlay"), "only one disk can hold the overlay")
        disks.append(disk)
        d.done()
    return tuple(disks)


def _check_root_image(o: _Obj, app: Application) -> None:
    """Refuse a root image that is not erofs or ext4, or that cannot be shared.

    A missing file is not refused here: the image may be built after the
    configuration is written; the start checks again and says it is missing.
    """
    overlay = next((i for i, d in enumerate(app.disks) if d.overlay), None)
    if overlay is not None and app.root_image is None:
        raise ConfigError(f"{_join(o.path, 'disks')}[{overlay}].overlay", "needs a root_image")
    if app.root_image is None:
        return
    try:
        probe_image(app.root_image, share=app.share_root)
    except ImageError as e:
        if not e.missing:
            raise ConfigError(_join(o.path, "root_image"), str(e)) from None


def _usb_id(o: _Obj, key: str) -> str:
    v = o.string(key, required=True)
    assert v is not None
    if not _USB_ID_RE.fullmatch(v):
        raise ConfigError(_join(o.path, key), f"{shown(v)} is not 4 lower-case hex digits")
    return v


def _parse_resource(name: str, o: _Obj) -> Resource:
    kind = o.string("type", required=True)
    res: Resource
    if kind == "network":
        res = NetworkResource(name=name, host_address=o.string("host_address"))
    elif kind == "directory":
        path = o.abspath("path", required=True)
        assert path is not None
        res = DirectoryResource(name=name, path=path, writable=o.boolean("writable", False))
    elif kind == "usb":
        serial = o.string("serial")
        if serial is not None and not _USB_SERIAL_RE.fullmatch(serial):
            raise ConfigError(_join(o.path, "serial"), "must be 1-126 printable ASCII characters")
        res = UsbResource(
            name=name, vendor=_usb_id(o, "vendor"), product=_usb_id(o, "product"), serial=serial
        )
    elif kind == "wayland":
        path = o.abspath("path", required=True)
        assert path is not None
        res = WaylandResource(name=name, path=path)
    else:
        known = ", ".join(json.dumps(t) for t in RESOURCE_TYPES)
        raise ConfigError(
            _join(o.path, "type"), f"unknown resource type {shown(kind)} (known: {known})"
        )
    o.done()
    return res


def parse_instance(
    name: str,
    o: _Obj | Mapping[str, object],
    defaults: Defaults,
    applications: Mapping[str, object],
    resources: Mapping[str, object],
    *,
    path: str | None = None,
    origin: str = "config",
    crosvm_available: bool | None = None,
) -> InstanceDef:
    """Validate one instance definition against known applications and resources.

    ``crosvm_available`` False makes an instance on crosvm an error (None:
    not checked, as when a configuration is checked off the host).
    """
    if not isinstance(o, _Obj):
        o = _Obj(path if path is not None else f"instances.{name}", dict(o))
    app = o.string("application", required=True)
    assert app is not None
    if app not in applications:
        raise ConfigError(_join(o.path, "application"), f"no application {shown(app)}")
    raw_res = o._get("resources", False)
    if raw_res is None:
        raw_res = []
    if not isinstance(raw_res, list):
        raise ConfigError(_join(o.path, "resources"), f"expected a list, got {_json_type(raw_res)}")
    seen: list[str] = []
    for i, r in enumerate(raw_res):
        where = f"{_join(o.path, 'resources')}[{i}]"
        if not isinstance(r, str):
            raise ConfigError(where, f"expected a resource name, got {_json_type(r)}")
        if r not in resources:
            raise ConfigError(where, f"no resource {shown(r)}")
        if r in seen:
            raise ConfigError(where, f"resource {shown(r)} is listed twice")
        seen.append(r)
    inst = InstanceDef(
        name=name,
        application=app,
        resources=tuple(seen),
        vmm=o.enum("vmm", VmmKind, defaults.vmm),
        accel=o.enum("accel", Accel, defaults.accel),
        stop_timeout=o.number("stop_timeout", defaults.stop_timeout, 0.0, 3600.0),
        origin=origin,
        restart=o.enum("restart", Restart, defaults.restart),
    )
    _check_backend(o, inst, defaults, applications, resources, crosvm_available)
    o.done()
    return inst


def _check_backend(
    o: _Obj,
    inst: InstanceDef,
    defaults: Defaults,
    applications: Mapping[str, object],
    resources: Mapping[str, object],
    crosvm_available: bool | None,
) -> None:
    """Refuse what the instance's VMM cannot express, before anything runs."""
    vmm_path = _join(o.path, "vmm")
    if "vmm" not in o.value:
        vmm_path += " (automatic choice)" if defaults.vmm_auto else " (from defaults.vmm)"
    accel_path = _join(o.path, "accel") + ("" if "accel" in o.value else " (from defaults.accel)")
    app = applications[inst.application]
    crosvm = inst.vmm is VmmKind.crosvm
    if crosvm and crosvm_available is False:
        raise ConfigError(vmm_path, "crosvm is asked for but no crosvm binary is on PATH")
    if isinstance(app, Application):
        if crosvm and app.arch is Arch.ppc64le:
            raise ConfigError(
                vmm_path,
                f'crosvm does not support ppc64le (application "{app.name}"); use vmm qemu',
            )
        if crosvm and inst.accel is not Accel.kvm:
            raise ConfigError(
                accel_path, "crosvm runs guests only with KVM; use accel kvm or vmm qemu"
            )
        if not crosvm and app.share_root and app.root_image and app.arch is not Arch.x86_64:
            raise ConfigError(
                vmm_path,
                f"QEMU 7.2 cannot share a root image on {app.arch.value} (applications."
                f"{app.name}.share_root); use vmm crosvm or share_root false",
            )
    for i, name in enumerate(inst.resources):
        if not crosvm and isinstance(resources.get(name), WaylandResource):
            raise ConfigError(
                f"{_join(o.path, 'resources')}[{i}]",
                f'wayland resource "{name}": QEMU has no virtio-wl; use vmm crosvm '
                f"({vmm_path} is qemu)",
            )


def _section(top: _Obj, key: str) -> list[tuple[str, _Obj]]:
    sec = top.obj(key)
    out = []
    for name, value in sec.value.items():
        validate_name(_join(sec.path, name), name)
        out.append((name, _Obj(_join(sec.path, name), value)))
    sec.seen.update(sec.value)
    return out


def parse_config(
    untrusted: object,
    runtime_instances: object = None,
    *,
    auto_vmm: VmmKind = VmmKind.qemu,
    crosvm_available: bool | None = None,
) -> Config:
    """Validate a parsed JSON configuration, plus the data file's instances if given.

    ``auto_vmm`` is what an absent ``defaults.vmm`` means (see
    :func:`resolve_auto_vmm`); ``crosvm_available`` as for :func:`parse_instance`.
    """
    top = _Obj("", untrusted)
    version = top.integer("version", 1, 1, 1)
    del version
    defaults = _parse_defaults(top.obj("defaults"), auto_vmm)
    apps = {n: _parse_application(n, o) for n, o in _section(top, "applications")}
    resources = {n: _parse_resource(n, o) for n, o in _section(top, "resources")}
    instances = {
        n: parse_instance(n, o, defaults, apps, resources, crosvm_available=crosvm_available)
        for n, o in _section(top, "instances")
    }
    top.done()
    if runtime_instances is not None:
        data = _Obj("data", runtime_instances)
        for name, o in _section(data, "instances"):
            if name in instances:
                raise ConfigError(
                    f"data.instances.{name}",
                    f'instance "{name}" is also defined in the configuration (instances.{name})',
                )
            instances[name] = parse_instance(
                name,
                o,
                defaults,
                apps,
                resources,
                origin="runtime",
                crosvm_available=crosvm_available,
            )
        data.integer("version", 1, 1, 1)
        data.done()
    return Config(defaults=defaults, applications=apps, resources=resources, instances=instances)


def _read_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{what} {path} is not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("", f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def load_data_file(path: Path) -> object:
    """Read the runtime data file; a missing file is an empty one."""
    if not path.exists():
        return None
    return _read_json(path, "data file")


def load_config(
    path: Path,
    data_file: Path | None = None,
    *,
    auto_vmm: VmmKind = VmmKind.qemu,
    crosvm_available: bool | None = None,
) -> Config:
    raw = _read_json(path, "configuration")
    data = load_data_file(data_file) if data_file is not None else None
    return parse_config(raw, data, auto_vmm=auto_vmm, crosvm_available=crosvm_available)


def instance_to_json(inst: InstanceDef, defaults: Defaults) -> dict[str, object]:
    """The data-file form of a runtime instance (only what differs from defaults)."""
    out: dict[str, object] = {"application": inst.application, "resources": list(inst.resources)}
    if inst.vmm != defaults.vmm:
        out["vmm"] = inst.vmm.value
    if inst.accel != defaults.accel:
        out["accel"] = inst.accel.value
    if inst.stop_timeout != defaults.stop_timeout:
        out["stop_timeout"] = inst.stop_timeout
    if inst.restart != defaults.restart:
        out["restart"] = inst.restart.value
    return out
