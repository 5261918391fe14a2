#!/bin/sh
# Build an application's root image for spectrumd (the image contract:
# README, "The image contract"): a read-only erofs (or ext4) file system
# holding a Debian root made by mmdebstrap from a list of packages, or a
# static busybox alone, plus host files added at given places.  The file is
# padded to a multiple of 2 MiB, so it can be shared (share_root, virtio-pmem).
#
# Cached: OUT is rebuilt only when its inputs change (this script, the
# options, the packages, the added files' names and contents); their hash is
# kept in OUT.inputs.  mmdebstrap's and mkfs's output goes to OUT.log.
#
# Usage: scripts/mkimage.sh [--packages "P1 P2 ..."] [--busybox] [--fs erofs|ext4]
#                           [--add SRC:DEST]... [--suite SUITE] OUT
#   --packages  Debian packages to install (mmdebstrap --variant=essential)
#   --busybox   no packages: a static busybox as /bin/sh (needs no network)
#   --add       copy a host file or directory SRC to DEST (absolute) in the image
#   --fs        the image's file system (default erofs)
#   --suite     Debian suite (default: the host's, bookworm on Debian 12)
# Run as root on Debian 12 (mmdebstrap, erofs-utils, e2fsprogs).
set -eu

log() { printf 'mkimage: %s\n' "$*"; }
die() { printf 'mkimage: error: %s\n' "$*" >&2; exit 1; }
usage() { die "usage: $0 [--packages LIST] [--busybox] [--fs erofs|ext4] [--add SRC:DEST]... [--suite S] OUT"; }

packages="" busybox=0 fs=erofs adds="" suite=""
while [ $# -gt 1 ]; do
  case $1 in
    --packages) packages=$2; shift ;;
    --busybox) busybox=1 ;;
    --fs) fs=$2; shift ;;
    --add) adds="$adds
$2"; shift ;;
    --suite) suite=$2; shift ;;
    *) usage ;;
  esac
  shift
done
[ $# -eq 1 ] || usage
case $1 in -*) usage ;; esac
out=$1
case $fs in erofs | ext4) ;; *) die "--fs must be erofs or ext4, not $fs" ;; esac
[ -n "$packages" ] || [ $busybox -eq 1 ] || die "give --packages or --busybox"
[ -z "$packages" ] || [ $busybox -eq 0 ] || die "--packages and --busybox exclude each other"
[ -n "$suite" ] || suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")

# The inputs' hash: options, this script, each added file's path and content.
inputs_hash() {
  {
    printf 'fs=%s busybox=%s suite=%s packages=%s\n' "$fs" "$busybox" "$suite" "$packages"
    cat "$0"
    printf '%s\n' "$adds" | while IFS= read -r a; do
      [ -n "$a" ] || continue
      printf 'add %s\n' "$a"
      src=${a%%:*}
      (cd "$src" 2>/dev/null && find . -print | LC_ALL=C sort | while IFS= read -r f; do
        if [ -f "$f" ]; then printf '%s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"; else printf '%s\n' "$f"; fi
      done) || sha256sum <"$src"
    done
    [ $busybox -eq 0 ] || sha256sum </bin/busybox
  } | sha256sum | cut -d' ' -f1
}

printf '%s\n' "$adds" | while IFS= read -r a; do
  [ -n "$a" ] || continue
  src=${a%%:*} dest=${a#*:}
  [ "$src" != "$a" ] || die "--add wants SRC:DEST, not $a"
  [ -e "$src" ] || die "--add: $src not found"
  case $dest in /*) ;; *) die "--add: $dest is not an absolute path" ;; esac
done

hash=$(inputs_hash)
if [ -f "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$hash" ]; then
  log "$out up to date"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap, file ownership in the image)"
need=""
[ -z "$packages" ] || command -v mmdebstrap >/dev/null 2>&1 || need="$need mmdebstrap"
[ "$fs" != erofs ] || command -v mkfs.erofs >/dev/null 2>&1 || need="$need erofs-utils"
[ "$fs" != ext4 ] || command -v mkfs.ext4 >/dev/null 2>&1 || need="$need e2fsprogs"
[ -z "$need" ] || die "missing$need (scripts/install-deps.sh installs them)"

outdir=$(dirname "$out")
mkdir -p "$outdir"
logfile=$out.log
: >"$logfile"
tmp=$(mktemp -d "$outdir/.mkimage.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
root=$tmp/root
failed() { tail -n 15 "$logfile" >&2; die "$1 (full log: $logfile)"; }

if [ -n "$packages" ]; then
  log "installing $packages ($suite) with mmdebstrap; log in $logfile"
  mirror=""
  [ -f /etc/apt/sources.list.d/debian.sources ] && mirror=/etc/apt/sources.list.d/debian.sources
  # shellcheck disable=SC2086
  mmdebstrap --variant=essential --mode=root \
    --include="$(printf '%s' "$packages" | tr -s ' \n' ',,')" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "$suite" "$root" $mirror >>"$logfile" 2>&1 || failed "mmdebstrap failed"
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/dev/*
else
  log "a static busybox root"
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
fi
# The mount points the guest binds in (it makes missing ones in the overlay).
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/run" "$root/tmp" "$root/mnt/spectrum"

printf '%s\n' "$adds" | while IFS= read -r a; do
  [ -n "$a" ] || continue
  src=${a%%:*} dest=${a#*:}
  mkdir -p "$root$(dirname "$dest")"
  cp -a "$src" "$root$dest"
done

img=$tmp/image
case $fs in
  erofs)
    # Uncompressed: DAX maps file data straight from the image.
    mkfs.erofs -T0 "$img" "$root" >>"$logfile" 2>&1 || failed "mkfs.erofs failed"
    ;;
  ext4)
    kib=$(du -sk "$root" | cut -f1)
    mib=$((kib * 5 / 4 / 1024 + 16))
    mkfs.ext4 -q -F -b 4096 -O ^has_journal -L spectrum-app -d "$root" "$img" "${mib}M" \
      >>"$logfile" 2>&1 || failed "mkfs.ext4 failed"
    ;;
esac
# virtio-pmem maps whole 2 MiB pages.
truncate -s %2M "$img"
chmod 644 "$img"
mv -f "$img" "$out"
printf '%s\n' "$hash" >"$out.inputs"
log "wrote $out ($fs, $(($(stat -c %s "$out") / 1048576)) MiB)"
