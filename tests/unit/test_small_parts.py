"""Console log rotation, path escaping, argument checks (the guest channels: test_guest_bounds)."""

from pathlib import Path

import pytest
from dbus_fast import Variant

from spectrumd.bus import validate
from spectrumd.bus.names import escape_path_element, instance_path, unescape_path_element
from spectrumd.daemon.main import parse_args
from spectrumd.errors import InvalidArgument
from spectrumd.supervisor.console import ConsoleLog


def test_console_log_is_bounded_and_rotated(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", max_bytes=100, keep=2)
    for i in range(50):
        log.write(f"line {i:03d}\n".encode())  # 9 bytes each, 450 in all
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["console.log", "console.log.1", "console.log.2"]
    sizes = [(tmp_path / f).stat().st_size for f in files]
    assert all(s <= 100 for s in sizes)
    # The newest output is in console.log, the one before it in .1.
    assert (tmp_path / "console.log").read_text().endswith("line 049\n")
    whole = (tmp_path / "console.log.1").read_text() + (tmp_path / "console.log").read_text()
    assert "line 040" in whole


def test_path_escaping_round_trips() -> None:
    assert escape_path_element("work-shell") == "work_2dshell"
    assert instance_path("a1") == "/org/spectrum_os/Spectrum1/instance/a1"
    for name in ("work-shell", "a", "0-0", "x--y", ""):
        assert unescape_path_element(escape_path_element(name)) == name


def test_validate_names_and_options() -> None:
    assert validate.name("name", "ok-1") == "ok-1"
    with pytest.raises(InvalidArgument, match="invalid name"):
        validate.name("name", "Bad Name")
    with pytest.raises(InvalidArgument, match="invalid name"):
        validate.name("name", "x" * 100)
    with pytest.raises(InvalidArgument, match="more than"):
        validate.names("resources", ["a"] * 65)
    assert validate.options({"accel": Variant("s", "tcg")}) == {"accel": "tcg"}
    with pytest.raises(InvalidArgument, match='unknown option "colour"'):
        validate.options({"colour": Variant("s", "red")})
    with pytest.raises(InvalidArgument, match=r"options\.accel: wrong type"):
        validate.options({"accel": Variant("u", 1)})


@pytest.mark.parametrize("value", ["-5", "1.5", "x", "2000000"])
def test_a_bad_file_server_poll_is_refused_naming_it(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", "c.json", "--file-server-poll", value])
    assert e.value.code == 2
    assert f"--file-server-poll: {value} is not a number of microseconds" in capsys.readouterr().err


def test_the_file_server_poll_defaults_to_a_millisecond() -> None:
    assert parse_args(["--config", "c.json"]).file_server_poll == 1000
    assert parse_args(["--config", "c.json", "--file-server-poll", "0"]).file_server_poll == 0
