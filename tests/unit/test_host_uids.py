"""The per-instance uid allocator, its start-up checks against the real user databases,
and the scan for processes already running under ids of the range."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumd.errors import Busy, Failed, InvalidArgument
from spectrumd.host.uids import (
    DEFAULT_RANGE,
    InstanceIds,
    SubIds,
    UidAllocator,
    UidRange,
    check_range,
    check_system,
    ids_of_status,
    processes_in_range,
    read_subids,
)

pytestmark = pytest.mark.timeout(60)

# A small range of its own inside the default one, for tests that touch the system.
TEST_RANGE = UidRange(DEFAULT_RANGE.first + 40000 + (os.getpid() % 1000) * 8, 8)


def test_the_default_range_is_free_on_this_system() -> None:
    assert DEFAULT_RANGE.first > 0 and DEFAULT_RANGE.last < 2**31
    assert DEFAULT_RANGE.first > 65519, "clear of systemd's DynamicUser range"
    check_system(DEFAULT_RANGE, instances=1000)


def test_the_range_must_hold_two_ids_per_instance() -> None:
    check_range(UidRange(100000, 6), 3, [], [])
    with pytest.raises(Failed, match=r"holds 5 ids; 3 instances need 6 \(2 per instance\)"):
        check_range(UidRange(100000, 5), 3, [], [])


@pytest.mark.parametrize(
    ("r", "text"),
    [
        (UidRange(0, 10), "ids must be 1 to"),
        (UidRange(65530, 10), "special id 65534"),
        (UidRange(61000, 500), "DynamicUser range"),
        (UidRange(2**32 - 4, 4), "ids must be 1 to"),
    ],
)
def test_special_ids_are_never_in_the_range(r: UidRange, text: str) -> None:
    with pytest.raises(Failed, match=text):
        check_range(r, 1, [], [])


def test_overlaps_name_the_user_group_or_subordinate_range() -> None:
    r = UidRange(200000, 100)
    with pytest.raises(Failed, match=r'overlaps user "alice" \(uid 200050\)'):
        check_range(r, 1, [("root", 0), ("alice", 200050)], [])
    with pytest.raises(Failed, match=r'overlaps group "media" \(gid 200099\)'):
        check_range(r, 1, [("bob", 200100)], [("media", 200099)])
    sub = SubIds("carol", 165536, 65536, "/etc/subuid")
    with pytest.raises(Failed, match=r'subordinate ids of "carol" in /etc/subuid'):
        check_range(r, 1, [], [], [sub])
    check_range(r, 1, [("dave", 199999)], [("g", 200100)], [SubIds("e", 100000, 100000, "x")])


def test_subordinate_id_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("u:100000:65536\nbroken line\nv:x:1\n")
    got = read_subids(tmp_path / "subuid", tmp_path / "missing")
    assert got == [SubIds("u", 100000, 65536, str(tmp_path / "subuid"))]


@contextlib.contextmanager
def system_user(name: str, uid: int) -> Iterator[None]:
    subprocess.run(
        ["useradd", "-M", "-N", "-u", str(uid), "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextlib.contextmanager
def system_group(name: str, gid: int) -> Iterator[None]:
    subprocess.run(["groupadd", "-g", str(gid), name], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_a_real_user_or_group_in_the_range_is_refused_by_name() -> None:
    name = f"spt-uid-{os.getpid()}"
    check_system(TEST_RANGE, 4)
    with system_user(name, TEST_RANGE.first + 3):
        with pytest.raises(Failed) as e:
            check_system(TEST_RANGE, 4)
        assert f'overlaps user "{name}" (uid {TEST_RANGE.first + 3})' in e.value.message
    with (
        system_group(name, TEST_RANGE.last),
        pytest.raises(Failed, match=f'overlaps group "{name}"'),
    ):
        check_system(TEST_RANGE, 4)
    check_system(TEST_RANGE, 4)  # removed again


def test_instances_get_distinct_ids_stable_across_runs() -> None:
    a = UidAllocator(UidRange(300000, 64))
    one, two = a.allocate("one"), a.allocate("two")
    ids = {one.vmm, one.fileserver, two.vmm, two.fileserver}
    assert len(ids) == 4 and all(i in a.range for i in ids) and 0 not in ids
    assert a.holder(one.vmm) == a.holder(one.fileserver) == "one"
    with pytest.raises(Failed, match="holds ids already"):
        a.allocate("one")
    a.release("one")
    assert a.holder(one.vmm) is None
    assert a.allocate("one") == one, "the same name gets the same ids while they are free"
    assert UidAllocator(UidRange(300000, 64)).allocate("two") == two


def test_colliding_names_probe_onward_and_a_full_range_is_busy() -> None:
    r = UidRange(400000, 4)  # two pairs
    alone = {n: UidAllocator(r).allocate(n) for n in ("a", "b", "c", "d", "e", "f")}
    rival = next(n for n in "bcdef" if alone[n] == alone["a"])  # prefers a's pair
    a = UidAllocator(r)
    first = a.allocate("a")
    second = a.allocate(rival)
    assert first == alone["a"] and {first.vmm, second.vmm} == {400000, 400002}
    with pytest.raises(Busy, match="no free ids"):
        a.allocate("z")
    a.release("a")
    assert a.allocate("z") == first


def test_reserved_ids_of_readopted_instances_are_never_handed_out() -> None:
    a = UidAllocator(UidRange(500000, 4))
    a.reserve(500000, "old")  # read from the kernel for a re-adopted VMM
    a.reserve(500000, "old")  # idempotent for the same holder
    got = a.allocate("new")
    assert (got.vmm, got.fileserver) == (500002, 500003)  # pair 0 is half held
    with pytest.raises(Failed, match="held by old"):
        a.reserve(500000, "other")
    with pytest.raises(Failed, match="outside the uid range"):
        a.reserve(499999, "old")
    with pytest.raises(Busy):
        a.allocate("third")  # pair 0 is half held
    a.release("old")
    assert a.allocate("third").vmm == 500000


def test_a_readopted_pair_is_held_whole_or_not_at_all() -> None:
    a = UidAllocator(UidRange(510000, 6))
    a.reserve(510003, "leftover pid 4242")
    with pytest.raises(Failed, match="held by leftover pid 4242"):
        a.adopt("old", InstanceIds(510002, 510003))
    assert a.holder(510002) is None, "nothing taken on refusal"
    a.adopt("old", InstanceIds(510000, 510001))
    assert a.ids_of("old") == InstanceIds(510000, 510001)
    assert a.allocate("new") == InstanceIds(510004, 510005)
    a.release("old")
    assert a.holder(510000) is None and a.holder(510003) == "leftover pid 4242"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcdefgh")), max_size=60))
def test_no_id_is_ever_held_twice(ops: list[tuple[bool, str]]) -> None:
    a = UidAllocator(UidRange(600000, 10))
    for alloc, name in ops:
        if alloc and a.ids_of(name) is None:
            with contextlib.suppress(Busy):
                a.allocate(name)
        elif not alloc:
            a.release(name)
        held = [i for n in "abcdefgh" if (ids := a.ids_of(n)) for i in (ids.vmm, ids.fileserver)]
        assert len(held) == len(set(held))
        assert all(i in a.range and i != 0 for i in held)


def test_range_parsing() -> None:
    assert UidRange.parse("100-199") == UidRange(100, 100)
    assert str(UidRange(100, 100)) == "100-199"
    for bad in ("100", "a-b", "200-100", "-5-3"):
        with pytest.raises(InvalidArgument, match="not FIRST-LAST"):
            UidRange.parse(bad)


def test_status_lines_give_every_uid_and_gid() -> None:
    text = "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9\n"
    assert ids_of_status(text) == {1, 2, 3, 4, 5, 6, 7, 8}


def test_a_leftover_process_under_an_id_of_the_range_is_found() -> None:
    uid, gid = TEST_RANGE.first, TEST_RANGE.first + 1
    assert processes_in_range(TEST_RANGE) == {}
    # What a crashed daemon leaves: a VMM still running as its instance's uid, and
    # one that kept only a group of the range.
    by_uid = subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])
    by_gid = subprocess.Popen(["sleep", "60"], group=gid, extra_groups=[])
    try:
        found = processes_in_range(TEST_RANGE)
        assert found == {by_uid.pid: {uid}, by_gid.pid: {gid}}
    finally:
        for p in (by_uid, by_gid):
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert processes_in_range(TEST_RANGE) == {}
