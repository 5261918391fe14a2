"""``spectrumctl config check FILE``: validate a configuration without a daemon.

The checks are the daemon's own (:func:`spectrumd.model.config.load_config`),
so a file that passes here is one the daemon accepts at start or on Reload,
and a file that fails gives the same message the daemon would.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spectrumd.errors import ConfigError
from spectrumd.model.config import load_config


def _where(error: ConfigError, path: Path, data_file: Path | None) -> str:
    """The file an error is about; errors without a key path already name theirs."""
    if not error.path:
        return ""
    if data_file is not None and (error.path == "data" or error.path.startswith("data.")):
        return f"{data_file}: "
    return f"{path}: "


def check(path: Path, data_file: Path | None = None) -> int:
    """Validate ``path`` (and the run-time data file, if given); return an exit status.

    Prints ``FILE: OK (...)`` on stdout, or the daemon's message on stderr,
    prefixed with the file it is about.
    """
    try:
        config = load_config(path, data_file)
    except ConfigError as e:
        print(f"{_where(e, path, data_file)}{e}", file=sys.stderr)
        return 1
    counts = ", ".join(
        _count(len(part), what)
        for part, what in (
            (config.applications, "application"),
            (config.resources, "resource"),
            (config.instances, "instance"),
        )
    )
    print(f"{path}: OK ({counts})")
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
