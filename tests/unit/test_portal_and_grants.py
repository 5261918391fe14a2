"""The portal line parser and the grant checks, with no daemon and no VM."""

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumd.errors import InvalidArgument
from spectrumd.supervisor.grants import check_host_directory, check_lifetime
from spectrumd.supervisor.portal import PortalRequest, parse_request, response_line

NOW = 1_000_000_000_000


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_parses_a_directory_request() -> None:
    r = parse_request(f"request r1 dir {b64('/home/u/Documents')} ro running".encode(), NOW)
    assert isinstance(r, PortalRequest)
    assert (r.id, r.resource, r.access, r.lifetime, r.expires_at_us) == (
        "r1",
        "/home/u/Documents",
        "ro",
        "running",
        0,
    )
    r = parse_request(f"request 7 resource {b64('docs')} rw until 60".encode(), NOW)
    assert isinstance(r, PortalRequest)
    assert (r.resource, r.lifetime, r.expires_at_us) == ("docs", "until", NOW + 60_000_000)


@pytest.mark.parametrize(
    "line",
    [
        f"request r1 dir {b64('relative')} ro running",  # dir must be absolute
        f"request r1 resource {b64('/abs')} ro running",  # a resource is a name
        "request r1 dir !!notbase64 ro running",
        f"request r1 dir {b64('/x')} ro until",  # until needs seconds
        f"request r1 dir {b64('/x')} ro until 0",
        f"request r1 dir {b64('/x')} ro running 5",
        f"request r1 file {b64('/x')} ro running",
        "request r1",
    ],
)
def test_bad_requests_with_an_id_get_an_answer(line: str) -> None:
    assert parse_request(line.encode(), NOW) == "r1"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"hello",
        b"request",
        b"request bad-id! dir x ro running",
        b"\xff\xfe",
        b"response r1 0 x",
    ],
)
def test_lines_without_a_usable_id_are_dropped(line: bytes) -> None:
    assert parse_request(line, NOW) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_raises(data: bytes) -> None:
    result = parse_request(data, NOW)
    assert result is None or isinstance(result, str | PortalRequest)


def test_response_line_round_trips() -> None:
    line = response_line("r1", 2, "no agent is registered")
    word, rid, code, text = line.decode().split()
    assert (word, rid, code) == ("response", "r1", "2")
    assert base64.b64decode(text).decode() == "no agent is registered"


def test_lifetimes() -> None:
    check_lifetime("running", 0, NOW)
    check_lifetime("until", NOW + 1, NOW)
    with pytest.raises(InvalidArgument, match="in the past"):
        check_lifetime("until", NOW - 1, NOW)
    with pytest.raises(InvalidArgument, match="only goes with"):
        check_lifetime("permanent", NOW + 1, NOW)
    with pytest.raises(InvalidArgument, match="not one of"):
        check_lifetime("forever", 0, NOW)


def test_host_directories(tmp_path: Path) -> None:
    held = check_host_directory(str(tmp_path))
    assert held.path == str(tmp_path) and held.ino == tmp_path.stat().st_ino
    held.close()
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for bad, why in [
        ("relative", "not an absolute path"),
        (f"{tmp_path}/../x", "not a canonical path"),
        (f"{tmp_path}/", "not a canonical path"),
        (f"{tmp_path}/f", "not a directory"),
        (f"{tmp_path}/link", "is a symbolic link"),  # a symlink is never followed
        (f"{tmp_path}/link/f", f'component "{tmp_path}/link" is a symbolic link'),
        (f"{tmp_path}/missing", "No such file"),
        ("/a\0b", "NUL"),
    ]:
        with pytest.raises(InvalidArgument, match=why):
            check_host_directory(bad)
