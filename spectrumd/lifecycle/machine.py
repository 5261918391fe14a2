"""The instance state machine: every rule about an instance's state is here.

Rules (DESIGN.md):

- ``stopped → starting → running ⇄ paused``; ``starting/running/paused → stopping → stopped``.
- Any state with a VMM can go to ``failed`` (with a reason): a VMM that exits
  unasked, a start that does not complete. ``failed`` behaves like
  ``stopped`` for a new start.
- ``kill`` is allowed whenever a VMM may exist (starting, running, paused,
  stopping); it ends in ``stopped``.
- ``stop`` works in every state with a VMM, and :func:`stop_plan` says how:
  in ``starting`` it cancels the rest of the start and ends the VMM (the
  power button only if its CPUs ran); in ``running`` it presses the power
  button, in ``paused`` it resumes the guest first (a paused guest cannot
  see the button); in ``stopping`` it joins the stop under way (and makes
  one where the guest or a kill began it). A guest cannot pin its instance
  in ``stopping``, because ``stopping`` always has a deadline that escalates
  as ``Stop`` does.
- A guest that powers itself off (its application ended, ``exited N``; or
  it cannot run it, ``failed TEXT``) moves ``running`` or ``paused`` to
  ``stopping``, and leaves ``stopping`` as it is; the VMM's exit then
  completes it, in ``failed`` when the guest said it failed. A VMM that
  exits cleanly without that announcement goes straight to ``stopped``.
- Control calls on a VM (hot-plug, USB) need one that runs or is paused
  (``control`` leaves the state as it is).
- A VMM that an earlier daemon left running is ``adopted`` (``running``) or
  ``adopted_paused``; one that is gone or cannot be taken back is ``lost``
  (``failed``).
- ``failed`` is the one state a restart policy acts on (:func:`is_failure`).

The table is the whole truth: a pair absent from it is an invalid call, which
the supervisor reports as InvalidState naming the current state. Which event
a VMM's exit (or a start that did not complete) is, is decided by
:func:`exit_event`. Nothing here performs I/O; the supervisor drives the
table and does the work.
"""

from __future__ import annotations

import enum

import attrs


class State(enum.StrEnum):
    stopped = "stopped"
    starting = "starting"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    failed = "failed"


class Event(enum.StrEnum):
    # Requests from callers.
    start = "start"
    stop = "stop"
    kill = "kill"
    pause = "pause"
    resume = "resume"
    control = "control"  # a control call on the VM (hot-plug); the state stays
    # Facts observed by the supervisor.
    started = "started"  # the VMM runs and its control channel answers
    guest_shutdown = "guest_shutdown"  # the guest announced it is powering off
    exited = "exited"  # the VMM exited cleanly (asked to, or the guest powered off)
    crashed = "crashed"  # the VMM exited unasked, or the start failed
    adopted = "adopted"  # a VMM left running by an earlier daemon was taken back
    adopted_paused = "adopted_paused"  # ... and its guest is paused
    lost = "lost"  # a VMM an earlier daemon left is gone or could not be taken back


S, E = State, Event

# States in which a VMM process may exist.
WITH_VMM = frozenset({S.starting, S.running, S.paused, S.stopping})
# States in which the VMM's control channel is attached and the guest exists.
UP = frozenset({S.running, S.paused})

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.stopped, E.start): S.starting,
    (S.failed, E.start): S.starting,
    (S.starting, E.started): S.running,
    (S.stopped, E.adopted): S.running,
    (S.stopped, E.adopted_paused): S.paused,
    (S.stopped, E.lost): S.failed,
    (S.failed, E.lost): S.failed,
    (S.running, E.pause): S.paused,
    (S.paused, E.resume): S.running,
    (S.running, E.control): S.running,
    (S.paused, E.control): S.paused,
    (S.running, E.stop): S.stopping,
    (S.paused, E.stop): S.stopping,
    (S.stopping, E.stop): S.stopping,
    (S.starting, E.stop): S.stopping,
    (S.running, E.guest_shutdown): S.stopping,
    (S.paused, E.guest_shutdown): S.stopping,
    (S.stopping, E.guest_shutdown): S.stopping,
    (S.starting, E.kill): S.stopping,
    (S.running, E.kill): S.stopping,
    (S.paused, E.kill): S.stopping,
    (S.stopping, E.kill): S.stopping,
    (S.stopping, E.exited): S.stopped,
    (S.running, E.exited): S.stopped,
    (S.paused, E.exited): S.stopped,
    (S.stopping, E.crashed): S.failed,
    (S.starting, E.crashed): S.failed,
    (S.running, E.crashed): S.failed,
    (S.paused, E.crashed): S.failed,
}


class InvalidTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"{event.value} is not possible while {state.value}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state after ``event``; raises InvalidTransition if the table has no such pair."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None


def allowed(state: State, event: Event) -> bool:
    return (state, event) in TRANSITIONS


def allowed_events(state: State) -> frozenset[Event]:
    return frozenset(e for (s, e) in TRANSITIONS if s == state)


def has_vmm(state: State) -> bool:
    """True in the states where a VMM process may exist."""
    return state in WITH_VMM


def is_up(state: State) -> bool:
    """True while the guest exists and its VMM answers (running or paused)."""
    return state in UP


def is_failure(state: State) -> bool:
    """True when the last run ended in a failure (a crash, a start that failed, a
    VMM lost across a daemon restart): what a restart policy acts on."""
    return state is S.failed


class StopPlan(enum.Enum):
    """What a ``stop`` does, by the state it comes in."""

    # The rest of the start is cancelled, then the VMM ended: the power button
    # only if its CPUs ran, else straight to SIGTERM and SIGKILL.
    cancel_start = "cancel_start"
    button = "button"  # the power button, then the escalation
    resume_and_button = "resume_and_button"  # a paused guest cannot see the button
    join = "join"  # a stop, a kill or the guest's power-off is under way: see it end

    @property
    def waits_for_calls(self) -> bool:
        """True if the stop lets a call under way (pause, hot-plug) finish first, so
        that it presses the button on the state that call left. A start holds
        its instance until it ends, and a stop under way needs no turn."""
        return self in (StopPlan.button, StopPlan.resume_and_button)


STOP_PLANS: dict[State, StopPlan] = {
    S.starting: StopPlan.cancel_start,
    S.running: StopPlan.button,
    S.paused: StopPlan.resume_and_button,
    S.stopping: StopPlan.join,
}


def stop_plan(state: State) -> StopPlan:
    """How a ``stop`` in ``state`` proceeds; raises InvalidTransition where it is not possible."""
    if not allowed(state, E.stop):
        raise InvalidTransition(state, E.stop)
    return STOP_PLANS[state]


@attrs.frozen
class ExitFacts:
    """What the supervisor knew when a VMM exited (all of it observed, none of it I/O here)."""

    # A part the VM cannot run without failed, and the VM was ended for it.
    failure: str | None = None
    # The reason of the stop step or kill that was under way, if one was.
    stop_reason: str | None = None
    # The status the guest reported with ``exited N``.
    guest_exit: int | None = None
    # Why the guest could not run the application (``failed TEXT``, validated).
    guest_failure: str | None = None
    # QMP SHUTDOWN's reason: "guest-shutdown", "guest-reset", "guest-panic".
    shutdown_reason: str | None = None
    # What the backend reads from the exit status: (clean, reason), or None.
    backend_said: tuple[bool, str] | None = None
    # The exit status in words ("vmm exited with status 1: <stderr>").
    described: str = "vmm exited"


def guest_failure_reason(text: str) -> str:
    """StateReason for a guest that said ``failed TEXT`` (``text`` already validated)."""
    return f"the guest could not start the application: {text}"


def exit_event(facts: ExitFacts) -> tuple[Event, str]:
    """Which event a VMM's exit is (``exited`` or ``crashed``), and its reason."""
    if facts.failure is not None:
        return E.crashed, facts.failure
    if facts.guest_failure is not None:
        # Before a stop's reason: what ended the VM then is not why it failed.
        return E.crashed, guest_failure_reason(facts.guest_failure)
    if facts.stop_reason is not None:
        return E.exited, facts.stop_reason
    if facts.guest_exit is not None:
        event = E.exited if facts.guest_exit == 0 else E.crashed
        return event, f"application exited with status {facts.guest_exit}"
    if facts.shutdown_reason == "guest-shutdown":
        return E.exited, "the guest powered off"
    if facts.shutdown_reason in ("guest-reset", "guest-panic"):
        return E.crashed, f"the guest crashed or rebooted ({facts.shutdown_reason})"
    if facts.backend_said is not None:
        clean, reason = facts.backend_said
        return (E.exited if clean else E.crashed), reason
    return E.crashed, facts.described
