#!/bin/sh
# Build spectrumd's embedded default guest: OUTDIR/vmlinuz (Debian's generic
# kernel) and OUTDIR/initramfs.img (static busybox, the modules the guest
# contract needs, /init).  Idempotent: exits at once when both outputs exist
# and were built from the same sources (a hash of them is kept in
# OUTDIR/sources.sha256; a fresh clone has new mtimes but the same hash).
# Run as root on Debian 12.
#
# Usage: guest/build.sh OUTDIR
# Environment: SPECTRUM_GUEST_KERNEL_PKG overrides the kernel package name.
set -eu

log() { printf 'guest/build: %s\n' "$*"; }
die() { printf 'guest/build: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
out=$1
src=$(cd "$(dirname "$0")" && pwd)
sources="$src/build.sh $src/init $src/spectrum-poweroff $src/spectrum-request"

# Modules loaded at every boot, then the USB ones, loaded only when the
# machine has an xHCI controller (they are most of the initramfs's load time).
# Names as modprobe knows them; dependencies are resolved below.
core_modules="virtio_pci virtio_mmio virtio_console virtio_net virtio_blk
  button evdev af_packet fuse virtiofs"
usb_modules="xhci_pci usb_storage sd_mod"
# The application's root image (erofs or ext4, on virtio-blk or virtio-pmem,
# under a tmpfs overlay): loaded only when the kernel command line names one
# (spectrum.root=), so a guest without an image does not pay for them.
image_modules="erofs ext4 overlay virtio_pmem nd_pmem"

sources_hash() {
  # shellcheck disable=SC2086
  cat $sources | sha256sum | cut -d' ' -f1
}

up_to_date() {
  [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.img" ] && [ -f "$out/sources.sha256" ] || return 1
  [ "$(cat "$out/sources.sha256")" = "$(sources_hash)" ]
}

if up_to_date; then
  log "guest up to date in $out"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod)"

# busybox-static ships /bin/busybox (it conflicts with the dynamic busybox).
need=""
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  need="$need busybox-static"
command -v cpio >/dev/null 2>&1 || need="$need cpio"
command -v depmod >/dev/null 2>&1 || need="$need kmod"
if [ -n "$need" ]; then
  log "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need ||
    { apt-get update && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends $need; }
fi
file -b /bin/busybox 2>/dev/null | grep -q dynamic && die "/bin/busybox is not static"

kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

tmp=$(mktemp -d /tmp/spectrum-guest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
chmod 755 "$tmp"
mkdir "$tmp/dl" "$tmp/kernel" "$tmp/root"
# apt downloads as _apt when it can write the target directory.
chown _apt "$tmp/dl" 2>/dev/null || true

pkg=${SPECTRUM_GUEST_KERNEL_PKG:-$(kernel_pkg)}
if [ -z "$pkg" ]; then
  log "linux-image-amd64 unknown to apt, running apt-get update"
  apt-get update
  pkg=$(kernel_pkg)
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64"
fi
log "kernel package $pkg"
(cd "$tmp/dl" && apt-get download "$pkg") || {
  log "download failed, running apt-get update"
  apt-get update
  (cd "$tmp/dl" && apt-get download "$pkg") || die "apt-get download $pkg failed"
}
deb=$(ls "$tmp"/dl/*.deb)
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/kernel"

kdir=$tmp/kernel
kver=$(ls "$kdir/lib/modules")
[ -f "$kdir/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $pkg"
# The package's modules.dep is made by its postinst, which did not run.
depmod -b "$kdir" "$kver"

# Under TCG, decompressing the xz bzImage takes about 5 s of a 9 s boot.
# Debian's kernel has CONFIG_PVH, so QEMU (and crosvm) boot the
# uncompressed ELF vmlinux directly: extract it from the bzImage the way
# the kernel's scripts/extract-vmlinux does, and keep the bzImage if that
# fails.
extract_vmlinux() {
  img=$1
  for fmt in xz:'\xfd7zXZ\x00' zstd:'\x28\xb5\x2f\xfd' gzip:'\x1f\x8b\x08'; do
    tool=${fmt%%:*}
    command -v "$tool" >/dev/null 2>&1 || continue
    for off in $(LC_ALL=C grep -aboP "${fmt#*:}" "$img" | cut -d: -f1); do
      tail -c +$((off + 1)) "$img" | "$tool" -dc >"$tmp/vmlinux" 2>/dev/null
      [ "$(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0
    done
  done
  return 1
}
kernel_image=$kdir/boot/vmlinuz-$kver
if extract_vmlinux "$kernel_image"; then
  kernel_image=$tmp/vmlinux
  log "extracted the uncompressed vmlinux (PVH boot)"
else
  log "could not extract vmlinux, using the compressed bzImage"
fi

root=$tmp/root
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
  "$root/dev" "$root/proc" "$root/sys" "$root/run" "$root/tmp" \
  "$root/root" "$root/mnt/spectrum" "$root/etc/acpi/PWRF" "$root/lib/modules"

# Copy each module with its dependencies, in load order, once; write the
# order to lib/modules/$1.order (busybox insmod takes uncompressed .ko).
add_modules() {
  list=$1
  shift
  : >"$root/lib/modules/$list.order"
  : >"$tmp/$list.deps"
  for m in "$@"; do
    modprobe -d "$kdir" -S "$kver" --show-depends "$m" >>"$tmp/$list.deps" ||
      die "module $m not found in $kver"
  done
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue          # "builtin NAME": nothing to load
    # CPU-specific crypto (e.g. crct10dif-pclmul) is optional, the generic
    # module is there, and TCG's CPU lacks the instructions (ENODEV).
    case $path in */kernel/arch/x86/crypto/*) continue ;; esac
    name=$(basename "$path")
    case $name in
      *.ko.xz) name=${name%.xz} ;;
      *.ko.zst) name=${name%.zst} ;;
    esac
    [ -e "$root/lib/modules/$name" ] && continue
    case $path in
      *.xz) xz -dc "$path" >"$root/lib/modules/$name" ;;
      *.zst) zstd -qdc "$path" >"$root/lib/modules/$name" ;;
      *) cp "$path" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >>"$root/lib/modules/$list.order"
  done <"$tmp/$list.deps"
}
# shellcheck disable=SC2086
add_modules core $core_modules
# shellcheck disable=SC2086
add_modules usb $usb_modules
# shellcheck disable=SC2086
add_modules image $image_modules
log "modules: $(wc -l <"$root/lib/modules/core.order") at boot," \
  "$(wc -l <"$root/lib/modules/usb.order") with xHCI," \
  "$(wc -l <"$root/lib/modules/image.order") with a root image"

cp /bin/busybox "$root/bin/busybox"
# Relative links: inside an application's root image the initramfs is bound
# at /run/spectrum-guest, where /bin/busybox would name the image's own file.
busybox --list-full | while read -r applet; do
  dir=${applet%/*}
  up=$(printf '%s' "$dir" | sed 's|[^/][^/]*|..|g')
  [ -e "$root/$applet" ] || ln -s "${up#/}/bin/busybox" "$root/$applet"
done

# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

install -m 755 "$src/init" "$root/init"
install -m 755 "$src/spectrum-poweroff" "$root/sbin/spectrum-poweroff"
install -m 755 "$src/spectrum-request" "$root/bin/spectrum-request"
# busybox acpid runs CONFDIR/PWRF/00000080 on the ACPI power button.
printf '#!/bin/sh\nexec /sbin/spectrum-poweroff "power button"\n' \
  >"$root/etc/acpi/PWRF/00000080"
chmod 755 "$root/etc/acpi/PWRF/00000080"
printf '%s %s\n' "$pkg" "$kver" >"$root/etc/spectrum-guest-kernel"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -9 -n >"$tmp/initramfs.img"

mkdir -p "$out"
# Same directory as the target, so mv is an atomic rename.
cp "$tmp/initramfs.img" "$out/.initramfs.img.tmp"
cp "$kernel_image" "$out/.vmlinuz.tmp"
mv -f "$out/.initramfs.img.tmp" "$out/initramfs.img"
mv -f "$out/.vmlinuz.tmp" "$out/vmlinuz"
sources_hash > "$out/sources.sha256"
printf '%s %s\n' "$pkg" "$kver" >"$out/kernel-version"
log "wrote $out/vmlinuz ($kver, $(du -k "$out/vmlinuz" | cut -f1) KiB)" \
  "and $out/initramfs.img ($(du -k "$out/initramfs.img" | cut -f1) KiB)"
