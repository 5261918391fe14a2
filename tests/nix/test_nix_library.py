"""The Nix library against the daemon's validator: same JSON, same messages."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from spectrumd.errors import ConfigError
from spectrumd.model.config import Config, load_config, parse_config
from spectrumd.supervisor import Supervisor
from spectrumd.supervisor.env import Environment
from tests.conftest import ROOT
from tests.nix.helpers import EXAMPLES, NIX_DIR, Nix, config_with_constructors, nix_string

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEMO_JSON = ROOT / "demo" / "config.json"


def base() -> dict[str, Any]:
    """The demo's configuration, its application without a root image (which
    the table's cases about images and architectures set themselves)."""
    config = copy.deepcopy(json.loads(DEMO_JSON.read_text()))
    for key in ("root_image", "share_root"):
        config["applications"]["shell"].pop(key, None)
    return config


def daemon_error(config: object, data: object = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(config, data)
    return str(e.value)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.nix")), ids=lambda p: p.name)
def test_every_example_is_accepted_by_the_daemon(nix: Nix, example: Path) -> None:
    r = nix.file(example)
    assert r.error is None, r.error
    config = parse_config(r.value)
    assert config.instances


def test_demo_example_is_the_demo_config(nix: Nix) -> None:
    assert nix.file(EXAMPLES / "demo.nix").value == json.loads(DEMO_JSON.read_text())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted key path (keys may not contain dots here)."""

    def apply(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            c = c.setdefault(p, {})
        c[last] = value

    return apply


def _rename_instance(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def apply(c: dict[str, Any]) -> None:
        c["instances"][new] = c["instances"].pop(old)

    return apply


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(c: dict[str, Any]) -> None:
        for m in mutations:
            m(c)

    return apply


LONG = "x" * 100 + "Y"

# (id, mutation of the demo configuration, the key path both must name)
WRONG: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "unknown-application",
        _set("instances.work-shell.application", "shel"),
        "instances.work-shell.application",
    ),
    (
        "unknown-resource",
        _set("instances.work-shell.resources", ["lan", "nope"]),
        "instances.work-shell.resources[1]",
    ),
    (
        "resource-twice",
        _set("instances.work-shell.resources", ["lan", "lan"]),
        "instances.work-shell.resources[1]",
    ),
    (
        "resource-not-a-name",
        _set("instances.home-shell.resources", [3]),
        "instances.home-shell.resources[0]",
    ),
    (
        "resources-not-a-list",
        _set("instances.home-shell.resources", "lan"),
        "instances.home-shell.resources",
    ),
    (
        "instance-without-application",
        _set("instances.home-shell", {"resources": []}),
        "instances.home-shell.application",
    ),
    (
        "relative-directory-path",
        _set("resources.docs.path", "usr/share/doc"),
        "resources.docs.path",
    ),
    ("non-canonical-path", _set("resources.docs.path", "/srv/../etc"), "resources.docs.path"),
    ("trailing-slash-path", _set("resources.docs.path", "/srv/docs/"), "resources.docs.path"),
    (
        "directory-without-path",
        _set("resources.docs", {"type": "directory"}),
        "resources.docs.path",
    ),
    ("unknown-resource-type", _set("resources.lan.type", "bluetooth"), "resources.lan.type"),
    ("resource-without-type", _set("resources.lan", {}), "resources.lan.type"),
    ("bad-instance-name", _rename_instance("home-shell", "Home Shell"), "instances.Home Shell"),
    ("long-bad-name", _rename_instance("home-shell", LONG), f"instances.{LONG}"),
    ("bad-resource-name", _set("resources.-lan", {"type": "network"}), "resources.-lan"),
    (
        "memory-as-string",
        _set("applications.shell.memory_mib", "256"),
        "applications.shell.memory_mib",
    ),
    (
        "memory-as-float",
        _set("applications.shell.memory_mib", 256.5),
        "applications.shell.memory_mib",
    ),
    (
        "memory-too-small",
        _set("applications.shell.memory_mib", 32),
        "applications.shell.memory_mib",
    ),
    ("vcpus-as-boolean", _set("applications.shell.vcpus", True), "applications.shell.vcpus"),
    ("command-missing", _set("applications.shell", {"vcpus": 1}), "applications.shell.command"),
    (
        "initrd-without-kernel",
        _set("applications.shell.initrd", "/boot/initrd.img"),
        "applications.shell.initrd",
    ),
    (
        "share-root-without-image",
        _set("applications.shell.share_root", True),
        "applications.shell.share_root",
    ),
    (
        "relative-disk",
        _set("applications.shell.disks", [{"path": "disk.img"}]),
        "applications.shell.disks[0].path",
    ),
    (
        "overlay-disk-read-only",
        _both(
            _set("applications.shell.root_image", "/r.img"),
            _set("applications.shell.disks", [{"path": "/o.img", "overlay": True}]),
        ),
        "applications.shell.disks[0].overlay",
    ),
    (
        "two-overlay-disks",
        _both(
            _set("applications.shell.root_image", "/r.img"),
            _set(
                "applications.shell.disks",
                [{"path": "/o.img", "writable": True, "overlay": True}] * 2
                + [{"path": "relative"}],
            ),
        ),
        "applications.shell.disks[1].overlay",
    ),
    (
        "overlay-disk-without-image",
        _set("applications.shell.disks", [{"path": "/o.img", "writable": True, "overlay": True}]),
        "applications.shell.disks[0].overlay",
    ),
    (
        "disks-not-a-list",
        _set("applications.shell.disks", {"path": "/d.img"}),
        "applications.shell.disks",
    ),
    ("unknown-arch", _set("applications.shell.arch", "riscv64"), "applications.shell.arch"),
    (
        "usb-vendor-upper-case",
        _set("resources.key", {"type": "usb", "vendor": "ABCD", "product": "0407"}),
        "resources.key.vendor",
    ),
    (
        "usb-product-short",
        _set("resources.key", {"type": "usb", "vendor": "1050", "product": "407"}),
        "resources.key.product",
    ),
    (
        "usb-serial-space",
        _set(
            "resources.key", {"type": "usb", "vendor": "1050", "product": "0407", "serial": "a b"}
        ),
        "resources.key.serial",
    ),
    (
        "wayland-relative-path",
        _set("resources.display", {"type": "wayland", "path": "wayland-0"}),
        "resources.display.path",
    ),
    (
        "unknown-application-key",
        _set("applications.shell.memory", 256),
        "applications.shell.memory",
    ),
    ("unknown-resource-key", _set("resources.lan.writable", True), "resources.lan.writable"),
    ("unknown-instance-key", _set("instances.home-shell.cpus", 2), "instances.home-shell.cpus"),
    ("unknown-top-key", _set("instance", {}), "instance"),
    ("unknown-vmm", _set("defaults.vmm", "firecracker"), "defaults.vmm"),
    (
        "unknown-accel-override",
        _set("instances.home-shell.accel", "hvf"),
        "instances.home-shell.accel",
    ),
    ("stop-timeout-too-long", _set("defaults.stop_timeout", 4000), "defaults.stop_timeout"),
    (
        "stop-timeout-float",
        _set("instances.work-shell.stop_timeout", 4000.5),
        "instances.work-shell.stop_timeout",
    ),
    ("version-2", _set("version", 2), "version"),
    (
        "wayland-under-qemu",
        _both(
            _set("resources.display", {"type": "wayland", "path": "/run/user/1000/wayland-0"}),
            _set("instances.work-shell.resources", ["lan", "docs", "display"]),
        ),
        "instances.work-shell.resources[2]",
    ),
    (
        "crosvm-under-tcg",
        _set("instances.home-shell.vmm", "crosvm"),
        "instances.home-shell.accel (from defaults.accel)",
    ),
    (
        "crosvm-ppc64le",
        _both(
            _set("applications.shell.arch", "ppc64le"),
            _set("defaults.accel", "kvm"),
            _set("instances.home-shell.vmm", "crosvm"),
        ),
        "instances.home-shell.vmm",
    ),
    ("applications-a-list", _set("applications", []), "applications"),
]


@pytest.mark.parametrize(("mutate", "key_path"), [w[1:] for w in WRONG], ids=[w[0] for w in WRONG])
def test_wrong_configs_fail_alike_in_nix_and_in_the_daemon(
    nix: Nix, mutate: Callable[[dict[str, Any]], None], key_path: str
) -> None:
    config = base()
    mutate(config)
    expected = daemon_error(config)
    assert expected.startswith(f"{key_path}: "), expected
    r = nix.expr(config_with_constructors(config))
    assert r.error == expected


def test_the_table_is_wide_enough() -> None:
    assert len(WRONG) >= 8


# -- the data file ------------------------------------------------------------


def _without_origin(c: Config) -> Config:
    return attrs.evolve(
        c, instances={n: attrs.evolve(i, origin="config") for n, i in c.instances.items()}
    )


def _nix_path(p: Path) -> str:
    return f"(/. + {nix_string(str(p))})"


def _adopt(config_file: Path, data_file: Path) -> str:
    """The configuration of config_file with the instances of data_file adopted."""
    return (
        f"let spectrum = import {NIX_DIR}; "
        f"base = builtins.fromJSON (builtins.readFile {_nix_path(config_file)}); "
        "in spectrum.config (base // { instances = spectrum.mergeInstances base.instances "
        f"(spectrum.importDataFile {_nix_path(data_file)}); }})"
    )


def test_the_daemons_data_file_round_trips_through_importDataFile(nix: Nix, tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(DEMO_JSON.read_text())
    env = Environment(state_dir=tmp_path / "state", guest_dir=tmp_path / "guest")
    sup = Supervisor(config_file, env)
    sup.create_instance("scratch", "shell", ["docs"], {})
    sup.create_instance("quick", "shell", ["lan", "docs"], {"vmm": "qemu", "stop_timeout": 5})
    sup.create_instance("bare", "shell", [], {"accel": "kvm"})
    data = json.loads(sup.data_path.read_text())
    assert sorted(data["instances"]) == ["bare", "quick", "scratch"]

    r = nix.expr(_adopt(config_file, sup.data_path))
    assert r.error is None, r.error
    adopted = r.value
    for name, body in data["instances"].items():
        assert adopted["instances"][name] == body
    assert _without_origin(parse_config(adopted)) == _without_origin(
        load_config(config_file, sup.data_path)
    )


def test_data_file_errors_are_named_as_the_daemon_names_them(nix: Nix, tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(DEMO_JSON.read_text())
    data_file = tmp_path / "instances.json"
    cases = [
        {"version": 1, "instances": {"scratch": {"application": "nope", "resources": []}}},
        {"version": 1, "instances": {"scratch": {"application": "shell", "resources": ["x"]}}},
        {"version": 1, "instances": {"Scratch": {"application": "shell"}}},
        {"version": 1, "instances": {"scratch": {"application": "shell", "color": "red"}}},
        {"version": 1, "instances": {"home-shell": {"application": "shell"}}},
        {"version": 2, "instances": {}},
        {"version": 1, "instances": {}, "grants": {}},
    ]
    for data in cases:
        data_file.write_text(json.dumps(data))
        with pytest.raises(ConfigError) as e:
            load_config(config_file, data_file)
        assert str(e.value).startswith("data"), e.value
        assert nix.expr(_adopt(config_file, data_file)).error == str(e.value), data


def test_a_missing_data_file_has_no_instances(nix: Nix, tmp_path: Path) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(DEMO_JSON.read_text())
    r = nix.expr(_adopt(config_file, tmp_path / "absent.json"))
    assert r.value == json.loads(DEMO_JSON.read_text())


def test_paths_may_be_nix_paths_and_are_never_copied(nix: Nix) -> None:
    r = nix.expr(
        f"let spectrum = import {NIX_DIR}; in spectrum.config {{"
        " resources.docs = spectrum.directory { path = /usr/share/doc; };"
        " resources.display = spectrum.wayland { path = /run/user/1000/wayland-0; }; }"
    )
    assert r.value == {
        "resources": {
            "docs": {"type": "directory", "path": "/usr/share/doc"},
            "display": {"type": "wayland", "path": "/run/user/1000/wayland-0"},
        }
    }


def test_nulls_mean_absent_as_in_the_daemon(nix: Nix) -> None:
    r = nix.expr(
        f"let spectrum = import {NIX_DIR}; in spectrum.config {{"
        ' applications.a = spectrum.application { command = "x"; kernel = null; };'
        ' instances.i = spectrum.instance { application = "a"; vmm = null; }; }'
    )
    assert r.value == {
        "applications": {"a": {"command": "x"}},
        "instances": {"i": {"application": "a"}},
    }
    parse_config(r.value)


def test_an_application_from_a_root_image(nix: Nix, tmp_path: Path) -> None:
    """The Nix side takes an image and an overlay disk; only the daemon reads the image."""
    image = tmp_path / "app.erofs"
    header = bytearray(2048)
    header[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    header[1024 + 12] = 12  # 4 KiB blocks
    image.write_bytes(bytes(header) + bytes((4 << 20) - 2048))
    expr = (
        f"let spectrum = import {NIX_DIR}; in spectrum.config {{"
        " applications.py = spectrum.application {"
        f'   command = "exec python3"; root_image = {_nix_path(image)}; share_root = true;'
        '   disks = [ { path = "/srv/py-rw.ext4"; writable = true; overlay = true; } ]; };'
        ' instances.one = spectrum.instance { application = "py"; }; }'
    )
    r = nix.expr(expr)
    assert r.error is None, r.error
    app = r.value["applications"]["py"]
    assert app["root_image"] == str(image) and app["share_root"] is True
    assert app["disks"] == [{"path": "/srv/py-rw.ext4", "writable": True, "overlay": True}]
    assert parse_config(r.value).applications["py"].disks[0].overlay
    # A corrupt image passes evaluation (Nix cannot read binary files), not the daemon.
    image.write_bytes(bytes(4 << 20))
    assert nix.expr(expr).error is None
    assert daemon_error(r.value).startswith("applications.py.root_image: root image ")
