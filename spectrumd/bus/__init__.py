"""The D-Bus surface: the only part that imports dbus-fast."""
