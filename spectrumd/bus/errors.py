"""The one place where exceptions become D-Bus errors.

A :class:`SpectrumError` becomes ``org.spectrum_os.Spectrum1.Error.<name>``
with its message. Anything else is a bug: one summary line at ERROR, the
traceback at DEBUG, and the caller gets ``Error.Failed`` without internals.
"""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from dbus_fast import DBusError

from spectrumd.bus.names import ERROR_PREFIX
from spectrumd.errors import SpectrumError

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def to_dbus_error(e: SpectrumError) -> DBusError:
    return DBusError(ERROR_PREFIX + e.name, e.message)


def wire_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap a D-Bus method so every failure leaves as a named error."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SpectrumError as e:
            raise to_dbus_error(e) from None
        except DBusError:
            raise
        except Exception as e:
            log.error("%s failed: %s: %s", fn.__name__, type(e).__name__, e)
            log.debug("traceback of %s", fn.__name__, exc_info=True)
            raise DBusError(
                ERROR_PREFIX + "Failed", f"internal error in {fn.__name__}; see the daemon's log"
            ) from None

    return wrapper
