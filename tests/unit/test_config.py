"""Configuration validation: every error names the key path and the problem."""

import json
from pathlib import Path

import pytest

from spectrumd.errors import ConfigError
from spectrumd.model import Accel, VmmKind, load_config, parse_config
from spectrumd.model.config import resolve_auto_vmm, validate_name

GOOD = {
    "defaults": {"vmm": "qemu", "accel": "tcg"},
    "applications": {"shell": {"command": "echo hello; exec sleep 3600", "memory_mib": 256}},
    "resources": {
        "lan": {"type": "network"},
        "docs": {"type": "directory", "path": "/srv/docs", "writable": False},
    },
    "instances": {
        "work-shell": {"application": "shell", "resources": ["lan", "docs"]},
        "home-shell": {"application": "shell", "resources": [], "accel": "kvm"},
    },
}


def with_(path: str, value: object) -> dict[str, object]:
    """A copy of GOOD with one key (dotted path) replaced; value None deletes it."""
    cfg = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return cfg


def test_good_config() -> None:
    c = parse_config(GOOD)
    ws = c.instances["work-shell"]
    assert ws.resources == ("lan", "docs")
    assert ws.vmm is VmmKind.qemu and ws.accel is Accel.tcg
    assert c.instances["home-shell"].accel is Accel.kvm
    assert ws.stop_timeout == 30.0
    assert c.applications["shell"].vcpus == 1


def test_defaults_are_kvm_and_qemu() -> None:
    c = parse_config(with_("defaults", {}))
    assert c.instances["work-shell"].accel is Accel.kvm
    assert c.instances["work-shell"].vmm is VmmKind.qemu


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "instances.work-shell.application",
            "shel",
            'instances.work-shell.application: no application "shel"',
        ),
        (
            "instances.work-shell.resources",
            ["lan", "nope"],
            'instances.work-shell.resources[1]: no resource "nope"',
        ),
        (
            "instances.work-shell.resources",
            ["lan", "lan"],
            'instances.work-shell.resources[1]: resource "lan" is listed twice',
        ),
        (
            "instances.work-shell.resources",
            "lan",
            "instances.work-shell.resources: expected a list, got a string",
        ),
        ("instances.work-shell.colour", "red", "instances.work-shell.colour: unknown key"),
        (
            "instances.Work_Shell",
            {"application": "shell"},
            'instances.Work_Shell: invalid name "Work_Shell"',
        ),
        (
            "applications.shell.memory_mib",
            "256",
            "applications.shell.memory_mib: expected an integer, got a string",
        ),
        ("applications.shell.memory_mib", 1, "applications.shell.memory_mib: 1 is out of range"),
        (
            "applications.shell.vcpus",
            True,
            "applications.shell.vcpus: expected an integer, got a boolean",
        ),
        ("applications.shell.command", None, "applications.shell.command: missing"),
        (
            "applications.shell.kernel",
            "vmlinuz",
            'applications.shell.kernel: "vmlinuz" is not an absolute path',
        ),
        (
            "resources.docs.path",
            "/srv/../etc",
            'resources.docs.path: "/srv/../etc" is not a canonical path',
        ),
        ("resources.docs.type", "disk", 'resources.docs.type: unknown resource type "disk"'),
        (
            "resources.docs.writable",
            "yes",
            "resources.docs.writable: expected true or false, got a string",
        ),
        ("defaults.vmm", "firecracker", 'defaults.vmm: "firecracker" is not "qemu" or "crosvm"'),
        ("defaults.accel", "hvf", 'defaults.accel: "hvf" is not "kvm" or "tcg"'),
        ("defaults.stop_timeout", -1, "defaults.stop_timeout: -1 is out of range"),
        ("colour", "red", "colour: unknown key"),
        (
            "resources.docs",
            {"type": "usb", "vendor": "12AB", "product": "0001"},
            'resources.docs.vendor: "12AB" is not 4 lower-case hex digits',
        ),
        ("resources.docs", {"type": "usb", "vendor": "12ab"}, "resources.docs.product: missing"),
        (
            "resources.docs",
            {"type": "wayland", "path": "wayland-0"},
            'resources.docs.path: "wayland-0" is not an absolute path',
        ),
        (
            "applications.shell.arch",
            "riscv64",
            'applications.shell.arch: "riscv64" is not "x86_64" or "aarch64" or "ppc64le"',
        ),
        (
            "applications.shell.share_root",
            True,
            "applications.shell.share_root: needs a root_image to share",
        ),
        (
            "applications.shell.disks",
            [{"path": "/d", "size": 1}],
            "applications.shell.disks[0].size: unknown key",
        ),
        ("instances", [], "instances: expected an object, got a list"),
    ],
)
def test_bad_config_names_key(path: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(with_(path, value))
    assert str(e.value).startswith(message)


def test_every_resource_type() -> None:
    cfg = with_(
        "resources",
        {
            "lan": {"type": "network", "host_address": "10.0.0.1/24"},
            "docs": {"type": "directory", "path": "/srv/docs", "writable": True},
            "key": {"type": "usb", "vendor": "1050", "product": "0407", "serial": "X1"},
            "wl": {"type": "wayland", "path": "/run/user/1000/wayland-0"},
        },
    )
    c = parse_config(cfg)
    assert [r.type for r in c.resources.values()] == ["network", "directory", "usb", "wayland"]
    assert c.resources["key"].summary() == "USB 1050:0407 serial X1"


def test_long_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="names must match"):
        parse_config(with_("instances." + "a" * 64, {"application": "shell"}))


@pytest.mark.parametrize(
    "value",
    ["\U00010000" * 80, "\x07" * 200, "a" * 5000, '"' * 300, "\\" * 300, "a" + "\\" * 300],
)
def test_a_bad_value_is_shown_short_whatever_its_escapes(value: str) -> None:
    # A character outside the BMP is 12 characters of JSON: the cut counts
    # what is shown, so a message stays short (the fuzzer's D-Bus errors are
    # at most 1,024 characters).
    with pytest.raises(ConfigError) as e:
        validate_name("instances", value)
    message = str(e.value)
    assert len(message) < 200, message
    assert message.startswith('instances: invalid name "') and '..."' in message
    json.loads(message.split("invalid name ", 1)[1].split(": names must")[0].replace('..."', '"'))
    with pytest.raises(ConfigError) as e:
        parse_config(with_("instances.one", {"application": value}))
    assert len(str(e.value)) < 200, str(e.value)


def test_data_file_instances_are_runtime_and_must_not_collide() -> None:
    data = {"version": 1, "instances": {"extra": {"application": "shell", "resources": ["lan"]}}}
    c = parse_config(GOOD, data)
    assert c.instances["extra"].origin == "runtime"
    dup = {"instances": {"work-shell": {"application": "shell"}}}
    with pytest.raises(ConfigError) as e:
        parse_config(GOOD, dup)
    assert "data.instances.work-shell" in str(e.value)
    assert "instances.work-shell" in str(e.value).split(":", 1)[1]


def test_load_config_reports_json_position(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text('{"applications": {,}}')
    with pytest.raises(ConfigError, match=r"c.json:1:\d+: invalid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")


# -- backends: what a VMM cannot express is refused at validation -------------

WL = {"type": "wayland", "path": "/run/user/1000/wayland-0"}


def backend_cfg(
    defaults: dict[str, object], app: dict[str, object] | None = None, resources: list[str] = ()
) -> dict[str, object]:
    return {
        "defaults": defaults,
        "applications": {"shell": {"command": "true", **(app or {})}},
        "resources": {"wl": WL},
        "instances": {"work-shell": {"application": "shell", "resources": list(resources)}},
    }


@pytest.mark.parametrize(
    ("cfg", "kwargs", "message"),
    [
        (
            backend_cfg({"vmm": "qemu"}, resources=["wl"]),
            {},
            'instances.work-shell.resources[0]: wayland resource "wl": QEMU has no virtio-wl; '
            "use vmm crosvm (instances.work-shell.vmm (from defaults.vmm) is qemu)",
        ),
        (
            backend_cfg({"vmm": "crosvm"}, {"arch": "ppc64le"}),
            {},
            "instances.work-shell.vmm (from defaults.vmm): crosvm does not support ppc64le "
            '(application "shell"); use vmm qemu',
        ),
        (
            backend_cfg({}, {"arch": "ppc64le"}),
            {"auto_vmm": VmmKind.crosvm},
            "instances.work-shell.vmm (automatic choice): crosvm does not support ppc64le",
        ),
        (
            backend_cfg({"vmm": "crosvm", "accel": "tcg"}),
            {},
            "instances.work-shell.accel (from defaults.accel): crosvm runs guests only with KVM",
        ),
        (
            backend_cfg({"vmm": "crosvm"}),
            {"crosvm_available": False},
            "instances.work-shell.vmm (from defaults.vmm): crosvm is asked for but no crosvm "
            "binary is on PATH",
        ),
        (
            backend_cfg(
                {"vmm": "qemu"}, {"arch": "aarch64", "root_image": "/r.img", "share_root": True}
            ),
            {},
            "instances.work-shell.vmm (from defaults.vmm): QEMU 7.2 cannot share a root image "
            "on aarch64",
        ),
        (
            backend_cfg({"vmm": "qemu"}, {"arch": "sparc"}),
            {},
            'applications.shell.arch: "sparc" is not "x86_64" or "aarch64" or "ppc64le"',
        ),
    ],
)
def test_backend_refuses_what_it_cannot_express(
    cfg: dict[str, object], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, **kwargs)  # type: ignore[arg-type]
    assert str(e.value).startswith(message), str(e.value)


def test_instance_vmm_override_is_named() -> None:
    cfg = backend_cfg({"vmm": "crosvm"})
    cfg["instances"]["work-shell"]["vmm"] = "crosvm"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^instances\.work-shell\.vmm: crosvm is asked"):
        parse_config(cfg, crosvm_available=False)


def test_runtime_instances_are_checked_too() -> None:
    data = {"instances": {"scratch": {"application": "shell", "vmm": "crosvm"}}}
    with pytest.raises(ConfigError, match=r"^data\.instances\.scratch\.vmm: crosvm is asked"):
        parse_config(backend_cfg({"vmm": "qemu"}), data, crosvm_available=False)


def test_wayland_and_pmem_under_crosvm_are_fine() -> None:
    cfg = backend_cfg({"vmm": "crosvm"}, {"root_image": "/r.img", "share_root": True}, ["wl"])
    c = parse_config(cfg, crosvm_available=True)
    assert c.instances["work-shell"].vmm is VmmKind.crosvm


@pytest.mark.parametrize(("available", "kind"), [(True, VmmKind.crosvm), (False, VmmKind.qemu)])
def test_automatic_vmm(available: bool, kind: VmmKind) -> None:
    assert resolve_auto_vmm(available) is kind
    c = parse_config(backend_cfg({}), auto_vmm=resolve_auto_vmm(available))
    assert c.defaults.vmm_auto and c.defaults.vmm is kind
    assert c.instances["work-shell"].vmm is kind
    explicit = parse_config(backend_cfg({"vmm": "qemu"}), auto_vmm=VmmKind.crosvm)
    assert not explicit.defaults.vmm_auto
    assert explicit.instances["work-shell"].vmm is VmmKind.qemu
