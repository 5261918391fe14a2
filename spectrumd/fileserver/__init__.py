"""The 9P2000.L file server: host directories exported to a guest as a DAG.

Layers, bottom up:

* :mod:`.messages`, :mod:`.codec`: the protocol as values and a sans-IO
  decoder/encoder (no I/O, no logging);
* :mod:`.resolve`, :mod:`.exports`, :mod:`.nodes`, :mod:`.fileops`: safe
  lookups below a directory fd, the live export table, fids and file
  operations;
* :mod:`.session`: one request in, one reply out, never raising;
* :mod:`.driver`: an asyncio stream served by a session on its own thread;
* :mod:`.control`, ``__main__``: the separate server process and its
  JSON-lines control socket; :mod:`.client`: the daemon's side of it.

The exported tree is a DAG: no ``..``, names are single components, no
host symlink is ever followed, and devices, FIFOs and sockets are never
opened. Nothing here imports D-Bus.
"""

from .client import FileServerClient, FileServerError

__all__ = ["FileServerClient", "FileServerError"]
