#!/bin/sh
# Make Debian's PyGObject (python3-gi), pycairo and pyatspi importable in the venv
# VENV, and nothing else of the system's Python.
#
# Why: PyGObject is built against the system's GTK and GLib; from PyPI it would need
# a compiler and GTK's headers. The venv's interpreter may not be Debian's (here it is
# pyenv's 3.11), so --system-site-packages would not even reach Debian's packages.
# CPython keeps its ABI within a minor version, so Debian's 3.11 modules load in any
# 3.11. The links sit in their own directory, named by a .pth file, so they come after
# the venv's own packages on sys.path.
set -eu
venv=$1
dist=/usr/lib/python3/dist-packages
if [ ! -d "$dist/gi" ]; then
    echo "venv-gi: $dist/gi is missing (apt-get install python3-gi); the desktop agent will not run" >&2
    exit 0
fi
links="$venv/debian-gi"
rm -rf "$links"
mkdir -p "$links"
for m in gi cairo pyatspi; do
    if [ -e "$dist/$m" ]; then ln -s "$dist/$m" "$links/$m"; fi
done
purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
realpath "$links" >"$purelib/spectrum-debian-gi.pth"
