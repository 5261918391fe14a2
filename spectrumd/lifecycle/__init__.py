"""The instance lifecycle as a pure transition table (no I/O, no logging)."""

from spectrumd.lifecycle.machine import (
    TRANSITIONS,
    Event,
    ExitFacts,
    InvalidTransition,
    State,
    StopPlan,
    allowed,
    allowed_events,
    exit_event,
    guest_failure_reason,
    has_vmm,
    is_failure,
    is_up,
    next_state,
    stop_plan,
)

__all__ = [
    "TRANSITIONS",
    "Event",
    "ExitFacts",
    "InvalidTransition",
    "State",
    "StopPlan",
    "allowed",
    "allowed_events",
    "exit_event",
    "guest_failure_reason",
    "has_vmm",
    "is_failure",
    "is_up",
    "next_state",
    "stop_plan",
]
