#!/bin/sh
# Install the Debian packages spectrumd's demo and tests need; skip what is there.
set -eu
# systemd-container: machined, and systemd-nspawn for the test that boots systemd.
PACKAGES="qemu-system-x86 busybox-static cpio kmod dbus systemd systemd-container nix-bin diod iproute2 socat fio"
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
