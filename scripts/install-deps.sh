#!/bin/sh
# Install the Debian packages spectrumd's demo and tests need; skip what is there.
set -eu
# systemd-container: machined, and systemd-nspawn for the test that boots systemd.
# mmdebstrap, erofs-utils, e2fsprogs: application root images (scripts/mkimage.sh).
# libglib2.0-bin: gdbus, for the test that reads every object with the real tools.
# python3-gi .. desktop-file-utils: the desktop agent (GTK 4 through PyGObject) and its
# tests (a virtual X display, AT-SPI to read it, xdotool to click, import for
# screenshots, desktop-file-validate for data/*.desktop). fio: the FUSE layer's test.
PACKAGES="qemu-system-x86 busybox-static cpio kmod dbus systemd systemd-container nix-bin diod iproute2 socat
mmdebstrap erofs-utils e2fsprogs libglib2.0-bin
python3-gi python3-gi-cairo gir1.2-gtk-4.0 xvfb at-spi2-core python3-pyatspi xdotool imagemagick desktop-file-utils fio"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "system packages: up to date"
    exit 0
fi
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
