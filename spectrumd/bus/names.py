"""Names of the D-Bus contract (DESIGN.md, version 1)."""

BUS_NAME = "org.spectrum_os.Spectrum1"
MANAGER_PATH = "/org/spectrum_os/Spectrum1"
INSTANCE_PREFIX = MANAGER_PATH + "/instance/"
MANAGER_IFACE = "org.spectrum_os.Spectrum1.Manager"
INSTANCE_IFACE = "org.spectrum_os.Spectrum1.Instance"
ERROR_PREFIX = "org.spectrum_os.Spectrum1.Error."
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"


def escape_path_element(name: str) -> str:
    """Escape a name for one object path element, like sd_bus_path_encode.

    Every byte outside ``[A-Za-z0-9]`` becomes ``_xx`` (lower-case hex), so
    ``work-shell`` becomes ``work_2dshell``; the empty name is ``_``.
    """
    if not name:
        return "_"
    out = []
    for b in name.encode():
        c = chr(b)
        out.append(c if c.isascii() and c.isalnum() else f"_{b:02x}")
    return "".join(out)


def unescape_path_element(element: str) -> str:
    if element == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(element):
        if element[i] == "_" and i + 3 <= len(element):
            raw.append(int(element[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(element[i]))
            i += 1
    return raw.decode()


def instance_path(name: str) -> str:
    return INSTANCE_PREFIX + escape_path_element(name)
