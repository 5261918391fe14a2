"""Adaptive polling: stay awake a little after a request, as QEMU's own
event loops do (``poll-max-ns``).

A guest's next request often comes soon after the reply to its last one (a
``dd`` or a ``find``: one request at a time). Sleeping in epoll_wait costs
that request a wake-up, and a cold cache for the Python that serves it. So
after serving a kick the loop polls without blocking (yielding the CPU
between polls) for a *window*, and blocks only once the window has passed.

The window adapts to what the guest does. When the next request came later
than the window but within ``max_window``, the window doubles (from
``MIN_WINDOW``); when it came later than ``max_window``, or not at all, the
window halves, down to nothing. A busy guest thus gets a window that covers
its pace; an idle one costs no polling.
"""

from __future__ import annotations

MIN_WINDOW = 32e-6
# A guest under TCG sends its next request some 0.5 ms after a reply; under
# KVM far sooner, and the adaptive window stays that short.
DEFAULT_POLL_MAX_US = 1000


class Spin:
    def __init__(self, max_window: float) -> None:
        self.max_window = max(0.0, max_window)
        self.window = 0.0
        self._idle_since: float | None = None  # when the last requests were answered

    def deadline(self) -> float | None:
        """Poll without blocking until then; None: block."""
        if self._idle_since is None or self.window <= 0.0:
            return None
        return self._idle_since + self.window

    def served(self, now: float) -> None:
        """A kick's requests were answered at *now*: the window starts."""
        self._idle_since = now

    def kicked(self, now: float) -> None:
        """A kick came at *now*: learn from how long the queue was idle."""
        if self._idle_since is None:
            return
        idle = now - self._idle_since
        self._idle_since = None
        if idle <= self.window:
            return  # caught while polling: the window fits
        if idle <= self.max_window:
            self.window = min(self.max_window, max(2 * self.window, MIN_WINDOW))
        else:
            self.window = self.window / 2 if self.window > MIN_WINDOW else 0.0
