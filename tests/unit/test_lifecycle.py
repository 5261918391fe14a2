"""The lifecycle table, with no event loop and no VM."""

import pytest

from spectrumd.lifecycle import (
    TRANSITIONS,
    Event,
    ExitFacts,
    State,
    StopPlan,
    allowed,
    allowed_events,
    exit_event,
    has_vmm,
    is_failure,
    is_up,
    next_state,
    stop_plan,
)
from spectrumd.lifecycle.machine import STOP_PLANS, InvalidTransition


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
    assert run(Event.adopted_paused) is State.paused
    assert run(Event.lost) is State.failed
    assert run(Event.lost, start=State.failed) is State.failed
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
        (State.starting, Event.control),
        (State.starting, Event.guest_shutdown),
        (State.stopping, Event.control),
        (State.running, Event.lost),
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
    assert allowed_events(State.stopped) == {
        Event.start,
        Event.adopted,
        Event.adopted_paused,
        Event.lost,
    }
    assert allowed_events(State.failed) == {Event.start, Event.lost}
    for (s, _e), target in TRANSITIONS.items():
        if not has_vmm(target):
            # Leaving the states with a VMM is only ever an observed exit (or an adoption that failed).
            assert _e in (Event.exited, Event.crashed, Event.lost), (s, _e)
    # No state is a dead end.
    for s in State:
        assert allowed_events(s), s


def test_stop_joins_a_stop_under_way() -> None:
    # A guest that announced its power-off (or a kill) leaves the instance in
    # stopping; a Stop then joins it rather than being refused.
    assert run(Event.guest_shutdown, Event.stop, Event.exited, start=State.running) is State.stopped
    assert run(Event.kill, Event.stop, Event.exited, start=State.running) is State.stopped


def test_a_graceful_stop_works_in_every_state_with_a_vmm() -> None:
    # Issue 13: "A graceful stop must work in every state that has a VMM."
    assert {s for s in State if allowed(s, Event.stop)} == {s for s in State if has_vmm(s)}
    assert set(STOP_PLANS) == {s for s in State if has_vmm(s)}
    for s in (State.starting, State.running, State.paused, State.stopping):
        assert run(Event.stop, Event.exited, start=s) is State.stopped
    # A stop that cannot end the VMM gracefully (it crashed meanwhile) is a failure.
    assert run(Event.stop, Event.crashed, start=State.starting) is State.failed


@pytest.mark.parametrize(
    ("state", "plan", "waits"),
    [
        (State.starting, StopPlan.cancel_start, False),
        (State.running, StopPlan.button, True),
        (State.paused, StopPlan.resume_and_button, True),
        (State.stopping, StopPlan.join, False),
    ],
)
def test_how_a_stop_proceeds(state: State, plan: StopPlan, waits: bool) -> None:
    assert stop_plan(state) is plan
    # A start holds its instance until it ends; a stop during it must not wait for that.
    assert plan.waits_for_calls is waits


@pytest.mark.parametrize("state", [State.stopped, State.failed])
def test_no_stop_without_a_vmm(state: State) -> None:
    with pytest.raises(InvalidTransition) as e:
        stop_plan(state)
    assert str(e.value) == f"stop is not possible while {state.value}"


def test_a_guest_exit_during_a_stop_keeps_stopping() -> None:
    assert run(Event.guest_shutdown, start=State.stopping) is State.stopping
    assert run(Event.stop, Event.guest_shutdown, Event.exited, start=State.running) is (
        State.stopped
    )


def test_only_failed_is_a_failure() -> None:
    assert {s for s in State if is_failure(s)} == {State.failed}


def test_control_calls_need_a_vm_that_is_up() -> None:
    assert run(Event.control, start=State.running) is State.running
    assert run(Event.control, start=State.paused) is State.paused
    assert {s for s in State if is_up(s)} == {State.running, State.paused}
    assert {s for s in State if has_vmm(s)} == {
        State.starting,
        State.running,
        State.paused,
        State.stopping,
    }


def test_a_clean_exit_without_an_announcement_ends_stopped() -> None:
    assert run(Event.exited, start=State.running) is State.stopped
    assert run(Event.exited, start=State.paused) is State.stopped


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (ExitFacts(stop_reason="killed", guest_exit=3), (Event.exited, "killed")),
        # A guest that said it cannot run the application: failed, in its words,
        # also when the power-off took a stop's escalation.
        (
            ExitFacts(guest_failure="root image: x", shutdown_reason="guest-shutdown"),
            (Event.crashed, "the guest could not start the application: root image: x"),
        ),
        (
            ExitFacts(guest_failure="root image: x", stop_reason="vmm terminated with SIGTERM"),
            (Event.crashed, "the guest could not start the application: root image: x"),
        ),
        (
            ExitFacts(failure="file server died", guest_failure="x"),
            (Event.crashed, "file server died"),
        ),
        (ExitFacts(guest_exit=0), (Event.exited, "application exited with status 0")),
        (ExitFacts(guest_exit=3), (Event.crashed, "application exited with status 3")),
        (ExitFacts(shutdown_reason="guest-shutdown"), (Event.exited, "the guest powered off")),
        (
            ExitFacts(shutdown_reason="guest-panic"),
            (Event.crashed, "the guest crashed or rebooted (guest-panic)"),
        ),
        (
            ExitFacts(backend_said=(True, "crosvm: guest powered off")),
            (Event.exited, "crosvm: guest powered off"),
        ),
        (
            ExitFacts(described="vmm exited with status 1: boom"),
            (Event.crashed, "vmm exited with status 1: boom"),
        ),
    ],
)
def test_which_event_a_vmm_exit_is(facts: ExitFacts, expected: tuple[Event, str]) -> None:
    assert exit_event(facts) == expected
