"""The instance lifecycle as a pure transition table (no I/O, no logging)."""

from spectrumd.lifecycle.machine import (
    TRANSITIONS,
    Event,
    State,
    allowed_events,
    next_state,
)

__all__ = ["TRANSITIONS", "Event", "State", "allowed_events", "next_state"]
