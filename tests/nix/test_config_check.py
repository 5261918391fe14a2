"""``spectrumctl config check``: the daemon's validation, without a daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spectrumd.cli.config_check import check
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(30)

DEMO_JSON = ROOT / "demo" / "config.json"


def _bad(tmp_path: Path) -> Path:
    config = json.loads(DEMO_JSON.read_text())
    config["instances"]["work-shell"]["application"] = "shel"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    return path


def test_a_good_file_is_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert check(DEMO_JSON) == 0
    out, err = capsys.readouterr()
    assert out == f"{DEMO_JSON}: OK (1 application, 2 resources, 2 instances)\n"
    assert err == ""


def test_a_bad_file_gives_the_daemons_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad(tmp_path)
    assert check(bad) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f'{bad}: instances.work-shell.application: no application "shel"\n'


def test_invalid_json_and_missing_files_are_named_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"defaults": {vmm: "qemu"}}')
    assert check(broken) == 1
    assert capsys.readouterr().err.startswith(f"{broken}:1:15: invalid JSON: ")
    assert check(tmp_path / "absent.json") == 1
    assert capsys.readouterr().err.startswith(f"cannot read configuration {tmp_path}/absent.json")


def test_the_data_file_is_checked_with_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "instances.json"
    data.write_text(json.dumps({"version": 1, "instances": {"scratch": {"application": "shell"}}}))
    assert check(DEMO_JSON, data) == 0
    assert "3 instances" in capsys.readouterr().out
    data.write_text(
        json.dumps({"version": 1, "instances": {"home-shell": {"application": "shell"}}})
    )
    assert check(DEMO_JSON, data) == 1
    assert capsys.readouterr().err == (
        f'{data}: data.instances.home-shell: instance "home-shell" is also defined'
        " in the configuration (instances.home-shell)\n"
    )
    assert check(DEMO_JSON, tmp_path / "absent.json") == 0, "a missing data file is an empty one"


@pytest.mark.parametrize(("good", "status"), [(True, 0), (False, 1)])
def test_spectrumctl_config_check(tmp_path: Path, good: bool, status: int) -> None:
    path = DEMO_JSON if good else _bad(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "spectrumd.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == status, r.stderr
    if good:
        assert r.stdout.endswith(": OK (1 application, 2 resources, 2 instances)\n")
    else:
        assert 'instances.work-shell.application: no application "shel"' in r.stderr
