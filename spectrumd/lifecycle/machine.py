"""The instance state machine.

Rules (DESIGN.md):

- ``stopped → starting → running ⇄ paused``; ``running/paused → stopping → stopped``.
- Any state with a VMM can go to ``failed`` (with a reason kept by the caller):
  a VMM that exits unasked, a start that does not complete.
- ``failed`` behaves like ``stopped`` for a new start.
- ``kill`` is allowed whenever a VMM may exist (starting, running, paused,
  stopping); it ends in ``stopped``.
- A guest that powers itself off (its application ended) moves ``running`` or
  ``paused`` to ``stopping``; the VMM's exit then completes it.
- A VMM that an earlier daemon left running is ``adopted``: a freshly loaded
  (``stopped``) instance becomes ``running`` (then ``paused`` if it was).

The table is the whole truth: a pair absent from it is an invalid call, which
the supervisor reports as InvalidState naming the current state. Nothing here
performs I/O; the supervisor drives the table and does the work.
"""

from __future__ import annotations

import enum


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
    # Facts observed by the supervisor.
    started = "started"  # the VMM runs and its control channel answers
    guest_shutdown = "guest_shutdown"  # the guest announced it is powering off
    exited = "exited"  # the VMM exited after a stop or kill was asked for
    crashed = "crashed"  # the VMM exited unasked, or the start failed
    adopted = "adopted"  # a VMM left running by an earlier daemon was taken back


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.stopped, E.start): S.starting,
    (S.failed, E.start): S.starting,
    (S.starting, E.started): S.running,
    (S.stopped, E.adopted): S.running,
    (S.running, E.pause): S.paused,
    (S.paused, E.resume): S.running,
    (S.running, E.stop): S.stopping,
    (S.paused, E.stop): S.stopping,
    (S.running, E.guest_shutdown): S.stopping,
    (S.paused, E.guest_shutdown): S.stopping,
    (S.starting, E.kill): S.stopping,
    (S.running, E.kill): S.stopping,
    (S.paused, E.kill): S.stopping,
    (S.stopping, E.kill): S.stopping,
    (S.stopping, E.exited): S.stopped,
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


def allowed_events(state: State) -> frozenset[Event]:
    return frozenset(e for (s, e) in TRANSITIONS if s == state)
