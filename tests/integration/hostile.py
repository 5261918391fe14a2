"""A hostile guest: the embedded guest with some of its files replaced.

The kernel unpacks every cpio archive of a concatenated initramfs in turn,
later files replacing earlier ones, so appending a small archive to the
embedded initramfs gives a guest whose programs the test chose: the attacker
with the guest's real powers (root in the guest, the real virtio ports).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path


def hostile_initrd(guest_dir: Path, out: Path, files: Mapping[str, str]) -> Path:
    """Write ``out``: the embedded initramfs with ``files`` (guest path → text) replaced."""
    stage = out.with_suffix(".d")
    for rel, text in files.items():
        target = stage / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    names = "\n".join(str(p.relative_to(stage)) for p in sorted(stage.rglob("*"))) + "\n"
    extra = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
        input=names.encode(),
        cwd=stage,
        capture_output=True,
        check=True,
    ).stdout
    base = (guest_dir / "initramfs.img").read_bytes()
    # The kernel looks for the next archive at a 4-byte boundary, past zeros.
    pad = b"\0" * (-len(base) % 4)
    out.write_bytes(base + pad + extra)
    return out


def patched_init(guest_dir: Path, old: str, new: str) -> str:
    """The embedded guest's /init with ``old`` replaced by ``new`` (which must be there)."""
    init = (Path(__file__).resolve().parents[2] / "guest" / "init").read_text()
    assert old in init, old
    return init.replace(old, new)
