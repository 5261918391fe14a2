"""The desktop side: the trusted agent's prompt and the management window (GTK 4).

A client of spectrumd like ``spectrumctl``, but on GLib's D-Bus (Gio) so that
everything runs on the GTK main loop. ``model`` is pure and tested without a
display; ``client`` is the Gio layer; ``agent``, ``dialog`` and ``manager`` are
the GTK drivers. Nothing here imports dbus-fast or the daemon's parts.
"""

import contextlib

# The versions this code is written for, fixed before any module imports
# gi.repository. Without PyGObject the pure model still imports.
with contextlib.suppress(ImportError):
    import gi

    gi.require_version("Gtk", "4.0")
    gi.require_version("Gdk", "4.0")
