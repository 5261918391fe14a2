"""Application root images for the tests, made by scripts/mkimage.sh (cached)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("SPECTRUMD_IMAGE_DIR", "/var/cache/spectrumd/images"))
MKIMAGE = ROOT / "scripts" / "mkimage.sh"
# The demo's image (demo/config.json names it): Debian's python3-minimal.
PYTHON_IMAGE = IMAGES / "python3.erofs"


def mkimage(out: Path, *args: str) -> Path:
    """``scripts/mkimage.sh ARGS OUT``; at once when OUT is up to date."""
    subprocess.run(["sh", str(MKIMAGE), *args, str(out)], check=True, timeout=900)
    return out


def python_image() -> Path:
    return mkimage(PYTHON_IMAGE, "--packages", "python3-minimal")
