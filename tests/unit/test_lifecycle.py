"""The lifecycle table, with no event loop and no VM."""

import pytest

from spectrumd.lifecycle import TRANSITIONS, Event, State, allowed_events, next_state
from spectrumd.lifecycle.machine import InvalidTransition


def run(*events: Event, start: State = State.stopped) -> State:
    s = start
    for e in events:
        s = next_state(s, e)
    return s


def test_normal_life() -> None:
    assert run(Event.start, Event.started) is State.running
    assert run(Event.start, Event.started, Event.pause) is State.paused
    assert run(Event.start, Event.started, Event.pause, Event.resume) is State.running
    assert run(Event.start, Event.started, Event.stop, Event.exited) is State.stopped


def test_failed_can_start_again() -> None:
    s = run(Event.start, Event.started, Event.crashed)
    assert s is State.failed
    assert next_state(s, Event.start) is State.starting


def test_start_that_fails() -> None:
    assert run(Event.start, Event.crashed) is State.failed


def test_kill_from_every_state_with_a_vmm_ends_stopped() -> None:
    for s in (State.starting, State.running, State.paused, State.stopping):
        assert run(Event.kill, Event.exited, start=s) is State.stopped


def test_adoption_after_a_daemon_restart() -> None:
    assert run(Event.adopted) is State.running
    assert run(Event.adopted, Event.pause) is State.paused
    with pytest.raises(InvalidTransition):
        next_state(State.running, Event.adopted)


def test_guest_shutdown() -> None:
    assert run(Event.guest_shutdown, Event.exited, start=State.running) is State.stopped
    assert run(Event.guest_shutdown, Event.exited, start=State.paused) is State.stopped


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.running, Event.start),
        (State.starting, Event.start),
        (State.stopped, Event.stop),
        (State.stopped, Event.kill),
        (State.failed, Event.stop),
        (State.paused, Event.pause),
        (State.running, Event.resume),
        (State.stopping, Event.stop),
        (State.stopped, Event.pause),
    ],
)
def test_invalid_calls(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransition) as e:
        next_state(state, event)
    assert state.value in str(e.value)


def test_table_is_closed() -> None:
    # Every target is a state, and only stopped/failed are entered without a VMM.
    for (_s, _e), target in TRANSITIONS.items():
        assert isinstance(target, State)
    assert allowed_events(State.stopped) == {Event.start, Event.adopted}
    assert allowed_events(State.failed) == {Event.start}
    # No state is a dead end.
    for s in State:
        assert allowed_events(s), s
