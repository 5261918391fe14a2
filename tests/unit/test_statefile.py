"""The one atomic writer: whole files or none, and never through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectrumd.supervisor.statefile import write_atomically


def test_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomically(target, "one")
    write_atomically(target, b"two")
    assert target.read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    d = tmp_path / "run"
    d.mkdir()
    (d / "state.json").symlink_to(victim)
    # Links under the old fixed temporary names change nothing either.
    (d / ".state.json.tmp").symlink_to(victim)
    write_atomically(d / "state.json", "ours")
    assert victim.read_text() == "untouched"
    assert not (d / "state.json").is_symlink()
    assert (d / "state.json").read_text() == "ours"


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):
        write_atomically(tmp_path / "link" / "state.json", "x")
    assert list(real.iterdir()) == []


def test_by_descriptor_and_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomically("grants.json", "old", dir_fd=fd)
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("")
        with pytest.raises(OSError):
            write_atomically("busy", "new", dir_fd=fd)  # rename onto a full directory
        with pytest.raises(ValueError):
            write_atomically("a/b", "x", dir_fd=fd)
    finally:
        os.close(fd)
    assert (tmp_path / "grants.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "grants.json"]
