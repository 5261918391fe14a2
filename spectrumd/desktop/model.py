"""The desktop's pure core: colours, the request queue, the click guard, texts.

No GTK, no D-Bus, no clock of its own (times are passed in), so all of it is
tested without a display. Only the standard library: the desktop package runs
under the system's Python with PyGObject and nothing else installed.
"""

from __future__ import annotations

import colorsys
import hashlib
import unicodedata
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

ERROR_PREFIX = "org.spectrum_os.Spectrum1.Error."
LIFETIMES = ("running", "until", "permanent")
ARM_DELAY = 1.0  # seconds a dialog must be shown and focused before its buttons work
MAX_SHOWN = 300  # characters of an untrusted string shown in a label


def instance_colour(name: str) -> str:
    """A colour fixed for ``name`` (``#rrggbb``), the same in every session.

    The hue comes from a hash of the name; saturation and lightness are fixed
    so that white text on it stays readable. Two names may share a hue: the
    colour helps recognition, the name shown beside it is what identifies.
    """
    digest = hashlib.sha256(name.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    r, g, b = colorsys.hls_to_rgb(hue, 0.38, 0.65)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def printable(untrusted: str, limit: int = MAX_SHOWN) -> str:
    """Text from a guest or the bus, safe to show: control and bidi-format
    characters (which could reorder or hide what the user reads) become
    ``\\uXXXX``; long text is cut with an ellipsis."""
    out = []
    for ch in untrusted:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class PendingRequest:
    """One Confirm call of the daemon, as the agent got it."""

    id: str
    instance: str
    application: str
    resource: str
    access: str
    lifetime: str
    expires_at_us: int = 0
    origin: str = ""


class RequestQueue:
    """Requests in arrival order; at most one shown per instance.

    ``add`` says whether the new request is to be shown now; ``remove`` (it
    was answered or ended elsewhere) gives the instance's next request to show.
    """

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, PendingRequest] = OrderedDict()
        self._shown: dict[str, str] = {}  # instance -> request id

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def get(self, request_id: str) -> PendingRequest | None:
        return self._by_id.get(request_id)

    def shown(self) -> list[PendingRequest]:
        return [self._by_id[rid] for rid in self._shown.values()]

    def add(self, req: PendingRequest) -> bool:
        """Queue ``req``; True if it is to be shown now. A duplicate id is ignored (False)."""
        if req.id in self._by_id:
            return False
        self._by_id[req.id] = req
        if req.instance in self._shown:
            return False
        self._shown[req.instance] = req.id
        return True

    def remove(self, request_id: str) -> PendingRequest | None:
        """Forget a request; returns the next one of its instance to show, if it was shown."""
        req = self._by_id.pop(request_id, None)
        if req is None or self._shown.get(req.instance) != request_id:
            return None
        del self._shown[req.instance]
        for other in self._by_id.values():
            if other.instance == req.instance:
                self._shown[req.instance] = other.id
                return other
        return None

    def clear(self) -> list[PendingRequest]:
        """Forget everything (the daemon went away); returns what was queued."""
        everything = list(self._by_id.values())
        self._by_id.clear()
        self._shown.clear()
        return everything


class ClickGuard:
    """Against click-through: armed only after the dialog has been shown and
    focused for ``delay`` seconds without a break. Losing focus starts over."""

    def __init__(self, delay: float = ARM_DELAY) -> None:
        self.delay = delay
        self._shown = False
        self._focused_since: float | None = None

    def shown(self, now: float, focused: bool) -> None:
        self._shown = True
        self.focus(now, focused)

    def focus(self, now: float, focused: bool) -> None:
        if not focused or not self._shown:
            self._focused_since = None
        elif self._focused_since is None:
            self._focused_since = now

    def remaining(self, now: float) -> float | None:
        """Seconds until armed; 0 when armed; None while not shown or not focused."""
        if self._focused_since is None:
            return None
        return max(0.0, self._focused_since + self.delay - now)

    def armed(self, now: float) -> bool:
        return self.remaining(now) == 0.0


@dataclass(frozen=True)
class Answer:
    """What the agent replies: allow, the lifetime, and for ``until`` when the
    grant ends (µs since the epoch). spectrumd makes the grant with that expiry
    and ends it then itself, whether or not the agent is still running."""

    allow: bool
    lifetime: str
    expires_at_us: int = 0


def plan_answer(req: PendingRequest, choice: str, minutes: int, now_us: int) -> Answer:
    """The reply for "allow with lifetime ``choice``" (``until``: for ``minutes``,
    and never past the request's own expiry: the user may shorten what was asked)."""
    if choice not in LIFETIMES:
        raise ValueError(f"lifetime {choice!r} is not one of {', '.join(LIFETIMES)}")
    if choice != "until":
        return Answer(True, choice)
    deadline = now_us + max(1, minutes) * 60_000_000
    if req.expires_at_us:
        deadline = min(deadline, req.expires_at_us)
    return Answer(True, "until", deadline)


def default_minutes(req: PendingRequest, now_us: int) -> int:
    """The "for N minutes" the dialog offers first: what the request asked, else 10."""
    if req.expires_at_us > now_us:
        return max(1, -(-(req.expires_at_us - now_us) // 60_000_000))
    return 10


@dataclass(frozen=True)
class ResourceView:
    kind: str  # "directory", "usb" or "resource"
    title: str  # one line: the host path, or the USB ids
    lines: tuple[tuple[str, str], ...] = ()  # further (label, value) rows


def parse_resource_list(rows: Iterable[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """ListResources' ``a(sss)`` → name: (type, summary)."""
    return {name: (kind, summary) for name, kind, summary in rows}


def _directory_path(summary: str) -> str:
    # The daemon's summary of a directory resource is "PATH (read-only|read-write)".
    for suffix in (" (read-only)", " (read-write)"):
        if summary.endswith(suffix):
            return summary.removesuffix(suffix)
    return summary


def describe_resource(
    untrusted_resource: str,
    resources: dict[str, tuple[str, str]],
    usb_devices: Iterable[tuple[str, str, str, str, str, str]] = (),
) -> ResourceView:
    """What a grant or request names, as the user should read it: the host
    path for a directory (also for a configured resource), vendor, product and
    serial for USB, with the descriptions of the present devices it matches."""
    res = untrusted_resource
    if res.startswith("/"):
        return ResourceView("directory", printable(res), (("Host directory", printable(res)),))
    if res.startswith("usb:"):
        parts = res.removeprefix("usb:").split(":", 2)
        vendor = parts[0] if parts else ""
        product = parts[1] if len(parts) > 1 else ""
        serial = urllib.parse.unquote(parts[2]) if len(parts) > 2 else ""
        lines = [("Vendor", printable(vendor)), ("Product", printable(product))]
        lines.append(("Serial", printable(serial) if serial else "any"))
        for _id, v, p, s, description, holder in usb_devices:
            if (v, p) == (vendor, product) and (not serial or s == serial):
                held = f" (held by {printable(holder, 64)})" if holder else ""
                lines.append(("Device", printable(description or _id) + held))
        ident = f"USB {vendor}:{product}" + (f" serial {serial}" if serial else "")
        return ResourceView("usb", printable(ident), tuple(lines))
    kind, summary = resources.get(res, ("", ""))
    if kind == "directory":
        path = _directory_path(summary)
        return ResourceView(
            "directory",
            printable(path),
            (("Resource", printable(res)), ("Host directory", printable(path))),
        )
    title = printable(summary or res)
    return ResourceView("resource", title, (("Resource", printable(res)),))


def access_text(access: str, kind: str) -> str:
    if kind == "usb":
        return "the whole device"
    return {"ro": "read-only", "rw": "read and write"}.get(access, printable(access, 16))


def lifetime_text(lifetime: str, expires_at_us: int, now_us: int) -> str:
    if lifetime == "permanent":
        return "permanent"
    if lifetime == "running":
        return "while it runs"
    if lifetime == "until" and expires_at_us:
        left = max(0, (expires_at_us - now_us) // 1_000_000)
        if left >= 3600:
            return f"{left // 3600} h {left % 3600 // 60} min left"
        if left >= 60:
            return f"{left // 60} min {left % 60} s left"
        return f"{left} s left"
    return printable(lifetime, 16)


_ERROR_TEXT = {
    "AccessDenied": "Not allowed",
    "Busy": "Busy",
    "InvalidState": "Not possible now",
    "NoSuchInstance": "No such instance",
    "NoSuchResource": "No such resource",
    "InvalidArgument": "Refused",
    "Timeout": "No answer in time",
    "Failed": "Failed",
}


def error_text(what: str, error_name: str, message: str) -> str:
    """A D-Bus error as one line for the user: ``Start work-shell: Not allowed: …``."""
    short = error_name.removeprefix(ERROR_PREFIX)
    if error_name == "org.freedesktop.DBus.Error.AccessDenied":
        # Refused by the bus policy rather than the daemon; its message is a dump of
        # the rule that matched, meant for an administrator's log.
        short = "AccessDenied"
        if message.startswith("Rejected send message"):
            message = "the bus lets only root and the group spectrum do this"
    if error_name in (
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ):
        return f"{what}: spectrumd is not running"
    if error_name == "org.freedesktop.DBus.Error.NoReply":
        return f"{what}: spectrumd did not answer"
    head = _ERROR_TEXT.get(short, short)
    return f"{what}: {head}: {printable(message, 200)}" if message else f"{what}: {head}"


def split_gerror(text: str) -> tuple[str, str]:
    """GLib writes a remote error as ``GDBus.Error:NAME: MESSAGE``; → (NAME, MESSAGE)."""
    if text.startswith("GDBus.Error:"):
        rest = text.removeprefix("GDBus.Error:")
        name, _, message = rest.partition(": ")
        return name, message
    return "", text
