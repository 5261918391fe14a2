from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nix.helpers import Nix


@pytest.fixture(scope="session")
def nix() -> Iterator[Nix]:
    tmp = Path(tempfile.mkdtemp(prefix="nix."))
    try:
        yield Nix(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
