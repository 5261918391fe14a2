"""Tasks whose callers may be gone: held until done, their outcome taken.

A caller that is cancelled (a Kill, a deadline) may leave behind work that
must run to its end: a library's clean-up, a command whose reply the next
command must not read. :func:`held` runs it in a task that is referenced
until it is done (the loop keeps only weak references) and whose exception
is taken, so that asyncio never reports it as never retrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_under_way: set[asyncio.Task[Any]] = set()


def held(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """*coro* in a task of its own, held until it is done, its outcome taken."""
    task = asyncio.ensure_future(coro)
    _under_way.add(task)
    task.add_done_callback(_taken)
    return task


def _taken(task: asyncio.Task[Any]) -> None:
    _under_way.discard(task)
    if not task.cancelled():
        task.exception()  # a caller that was cancelled no longer needs it
