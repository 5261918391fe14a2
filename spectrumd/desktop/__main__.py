"""``python -m spectrumd.desktop agent|manager [--bus ...]``."""

import sys

from spectrumd.desktop.main import agent_main, manager_main

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("agent", "manager"):
        sys.exit("usage: python -m spectrumd.desktop agent|manager [--bus BUS]")
    sys.exit((agent_main if which == "agent" else manager_main)(sys.argv[2:]))
