"""The asyncio driver of one 9P connection.

Design: the file-server process runs one event loop for the control socket
and every connection's stream I/O; each connection also gets one worker
thread that runs its :class:`.session.Session`. Requests of a connection
are answered strictly one after another, on that thread, so

* a slow disk, a large read or write (up to the 1 MiB msize) or a big
  directory listing never stalls the loop, other guests or the control
  socket;
* a Session is only ever touched by its own thread, with no locks, and
  Tflush is trivially right (the flushed request was answered before);
* closing a connection queues ``session.close()`` behind any operation
  still running, so an fd is never closed under a syscall using it.

Sequential handling costs little: a guest reaches this server through a
virtio-serial relay that moves about 12 MiB/s (see FACTS.md), far below
what one thread doing pread/pwrite sustains.

Nothing escapes :func:`serve_connection`: a framing error (a frame over
msize or under the header size) ends the connection, as does any other
failure, which is logged; the process and other connections carry on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from concurrent.futures import ThreadPoolExecutor

from .codec import Decoder, ProtocolError, encode
from .messages import Rlerror
from .session import Session

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: Session,
    *,
    name: str = "9p",
) -> None:
    """Serve 9P on one stream until EOF, a protocol error or cancellation.

    Raises only CancelledError (when cancelled); the stream is closed and
    the session's fids released in every case.
    """
    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    decoder = Decoder(session.msize)
    try:
        while data := await reader.read(_READ_CHUNK):
            decoder.feed(data)
            while (msg := decoder.next_message()) is not None:
                reply = await loop.run_in_executor(worker, session.handle, msg)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("%s: %.300r -> %.300r", name, msg, reply)
                try:
                    frame = encode(reply)
                    if len(frame) > session.msize:
                        # The client would drop the connection on a reply
                        # over msize; a failed request is kinder.
                        raise ValueError(f"reply of {len(frame)} bytes is over msize")
                except ValueError:
                    logger.debug("%s: cannot send %s", name, type(reply).__name__, exc_info=True)
                    frame = encode(Rlerror(msg.tag, errno.EIO))
                writer.write(frame)
                # After Tversion the negotiated msize bounds later frames.
                decoder.max_size = session.msize
                await writer.drain()
    except ProtocolError as e:
        logger.warning("%s: closing connection: %s", name, e)
    except (ConnectionError, OSError) as e:
        logger.info("%s: connection lost: %s", name, e)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.error("%s: connection failed, closing it", name)
        logger.debug("%s: traceback", name, exc_info=True)
    finally:
        # Behind whatever the worker is still doing (see module docstring).
        worker.submit(session.close)
        worker.shutdown(wait=False)
        writer.close()
