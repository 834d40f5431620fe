#!/usr/bin/env bash
# Builds, once per set of inputs, a Debian image of one suite (bullseye, bookworm,
# trixie, ...) with its own kernel and what meshaccel needs, for vagrant/run-in-vm.sh:
#
#   vagrant/build-image.sh [--rebuild] [IMAGE]      (default: bookworm)
#
# IMAGE is a Debian codename (bullseye, bookworm, trixie, ...: the suite's newest kernel,
# from its security archive when it has one) or CODENAME-ABI for one kernel of that
# suite by its ABI name, e.g. bookworm-6.1.0-47 (linux-image-6.1.0-47-amd64 and its
# headers, which must still be in the mirror's suite or its security archive), or of
# an older suite under this suite's userspace (bookworm-5.10.0-32: bullseye's kernel).
#
# Output, under $MESHACCEL_VM_CACHE (default /var/cache/meshaccel-vm, outside the repo):
#   IMAGE/rootfs.ext4   raw ext4 root filesystem (run-in-vm.sh boots it with -snapshot)
#   IMAGE/vmlinuz, IMAGE/initrd.img   the image's own kernel, booted with -kernel/-initrd
#   IMAGE/kernel-release, IMAGE/packages.txt   what is inside (uname -r, dpkg -l)
#   IMAGE/inputs.sha256   hash of this script, the suite, package list and mirrors: the
#                         image is rebuilt only when it changes (or with --rebuild)
#
# The guest has no systemd at boot: the kernel runs /usr/local/sbin/ma-init (written
# below) as PID 1, which mounts what meshaccel needs, runs the command that
# run-in-vm.sh left on the "run" 9p share, records its exit code there and powers off.
# Needs root (mmdebstrap --mode=root, mkfs.ext4 -d). Installs qemu-system-x86 and
# mmdebstrap when missing.
set -euo pipefail

say() { printf '[build-image] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

REBUILD=0
SUITE=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) REBUILD=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) SUITE=$1 ;;
  esac
  shift
done
IMAGE=$SUITE
[[ $IMAGE =~ ^([a-z]+)(-([0-9]+\.[0-9]+\.[0-9]+-[0-9]+))?$ ]] ||
  die "image must be a Debian codename (e.g. bookworm) or CODENAME-ABI (e.g. bookworm-6.1.0-47)"
SUITE=${BASH_REMATCH[1]}
KABI=${BASH_REMATCH[3]}
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, mkfs.ext4 -d)"

CACHE=${MESHACCEL_VM_CACHE:-/var/cache/meshaccel-vm}
MIRROR=${MESHACCEL_VM_MIRROR:-http://deb.debian.org/debian}
# (MESHACCEL_VM_SECURITY_MIRROR= empty: no security suite, e.g. for a suite whose
# security archive has gone)
# bullseye's security archive lists packages its pool no longer serves (bpftool: 404), so
# bullseye is built from its final point release (main) unless a mirror is given.
case "$SUITE" in
  bullseye) SECURITY_MIRROR=${MESHACCEL_VM_SECURITY_MIRROR-} ;;
  *) SECURITY_MIRROR=${MESHACCEL_VM_SECURITY_MIRROR-http://deb.debian.org/debian-security} ;;
esac
OUT=$CACHE/$IMAGE

# What meshaccel needs (as scripts/setup.sh), its kernel tests' Python modules from
# Debian (the guest has no network, so no pip), and the suite's own kernel + headers
# (bcc compiles against /lib/modules/$(uname -r)/build, which they provide).
# wrk, uvloop (the lab's apps) and matplotlib: `meshaccel bench --out` (Envoy comes from
# the checkout's .venv).
if [ -n "$KABI" ]; then
  PACKAGES=("linux-image-$KABI-amd64" "linux-headers-$KABI-amd64")
else
  PACKAGES=(linux-image-amd64 linux-headers-amd64)
fi
PACKAGES+=(
  python3-bpfcc bpftool iproute2 iptables python3-venv gcc
  kmod mount mawk procps psmisc util-linux e2fsprogs ca-certificates
  python3-pytest python3-pyroute2 python3-click python3-yaml python3-psutil
  python3-prometheus-client python3-kubernetes python3-aiohttp python3-hypothesis
  python3-uvloop wrk python3-matplotlib
)
case "$SUITE" in
  bullseye) PACKAGES+=(libbpf0) ;; # bullseye has no libbpf1
  *) PACKAGES+=(libbpf1) ;;
esac

HASH=$( {
  cat "$0"
  printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "${PACKAGES[@]}"
} | sha256sum | cut -d' ' -f1)

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$IMAGE"
flock 9 # one build of a suite at a time; run-in-vm.sh waits here too

if [ "$REBUILD" = 0 ] && [ -f "$OUT/rootfs.ext4" ] && [ "$(cat "$OUT/inputs.sha256" 2>/dev/null)" = "$HASH" ]; then
  say "$IMAGE image is up to date: $OUT (kernel $(cat "$OUT/kernel-release"))"
  exit 0
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null
fi

t0=$(date +%s)
WORK=$(mktemp -d "$CACHE/.build-$IMAGE.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

# Security updates carry the newest kernel of a stable suite; testing/unstable have none.
SOURCES=("deb $MIRROR $SUITE main")
case "$SUITE" in
  sid | unstable | experimental | forky | testing) ;;
  *) [ -z "$SECURITY_MIRROR" ] || SOURCES+=("deb $SECURITY_MIRROR $SUITE-security main") ;;
esac

# CODENAME-ABI with another suite's kernel (e.g. bookworm-5.10.0-32: bullseye's 5.10 under
# bookworm's userspace, to measure that kernel with the Python meshaccel needs) takes the
# kernel from that suite; everything else stays the newer suite's.
if [ -n "$KABI" ]; then
  case "$KABI" in
    4.19.*) KSUITE=buster ;;
    5.10.*) KSUITE=bullseye ;;
    6.1.*) KSUITE=bookworm ;;
    6.12.*) KSUITE=trixie ;;
    *) KSUITE=$SUITE ;;
  esac
  [ "$KSUITE" = "$SUITE" ] || SOURCES+=("deb $MIRROR $KSUITE main")
fi

say "building $IMAGE ($SUITE) with mmdebstrap (${#PACKAGES[@]} packages, about a minute)"
INCLUDE=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --mode=root --variant=apt --include="$INCLUDE" \
  --customize-hook='echo meshaccel-vm > "$1/etc/hostname"' \
  --customize-hook='printf "/dev/vda / ext4 rw 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
  "$SUITE" "$ROOT" "${SOURCES[@]}" 2>&1 | sed -u 's/^/[mmdebstrap] /' >&2

mkdir -p "$ROOT/src" "$ROOT/run/ma"
cat >"$ROOT/usr/local/sbin/ma-init" <<'INIT'
#!/bin/bash
# PID 1 of the meshaccel test VM (see vagrant/build-image.sh): mount what meshaccel
# needs, run /run/ma/cmd from the "run" 9p share with the checkout at /src (read-only),
# write its output and exit code to the share, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
say() { echo "[guest] $*"; }
off() { sync; echo o >/proc/sysrq-trigger; sleep 10; }
trap off EXIT
mnt() { mountpoint -q "$3" || { mkdir -p "$3" && mount -t "$1" "$2" "$3" ${4:+-o "$4"}; }; }
mnt proc proc /proc
mnt sysfs sys /sys
mnt devtmpfs dev /dev
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /run mode=755
mnt tmpfs tmpfs /tmp
mnt cgroup2 cgroup2 /sys/fs/cgroup
mnt bpf bpf /sys/fs/bpf
mnt debugfs debugfs /sys/kernel/debug
mnt tracefs tracefs /sys/kernel/tracing
ln -sfn /proc/self/fd /dev/fd
hostname meshaccel-vm
ip link set lo up
modprobe -q 9pnet_virtio; modprobe -q 9p
mnt 9p src /src trans=virtio,version=9p2000.L,msize=262144,ro
mnt 9p run /run/ma trans=virtio,version=9p2000.L,msize=262144
if [ ! -f /run/ma/cmd ]; then
  say "no /run/ma/cmd: nothing to run"
  exit
fi
say "up after $(cut -d' ' -f1 /proc/uptime)s: kernel $(uname -r), $(nproc) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
uname -r >/run/ma/kernel-release
cd /src
start=$(date +%s.%N)
set -o pipefail
bash /run/ma/cmd 2>&1 </dev/null | tee /run/ma/output.log
rc=$?
say "command finished: rc=$rc after $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')s"
echo "$rc" >/run/ma/rc
INIT
chmod 755 "$ROOT/usr/local/sbin/ma-init"

kver=$(ls "$ROOT/lib/modules" | sort -V | tail -n 1)
[ -n "$kver" ] && [ -f "$ROOT/boot/vmlinuz-$kver" ] && [ -f "$ROOT/boot/initrd.img-$kver" ] ||
  die "no kernel or initrd in the image (/boot: $(ls "$ROOT/boot" | tr '\n' ' '))"
# (build is an absolute symlink into /usr/src: resolve it inside the image, not on this host)
chroot "$ROOT" test -e "/lib/modules/$kver/build/include" || die "no headers at /lib/modules/$kver/build"

say "making the ext4 image"
size_mb=$(($(du -sm "$ROOT" | cut -f1) + 1024))
mkdir -p "$WORK/out"
truncate -s "${size_mb}M" "$WORK/out/rootfs.ext4"
mkfs.ext4 -q -F -L meshaccel-vm -d "$ROOT" "$WORK/out/rootfs.ext4"
cp "$ROOT/boot/vmlinuz-$kver" "$WORK/out/vmlinuz"
cp "$ROOT/boot/initrd.img-$kver" "$WORK/out/initrd.img"
echo "$kver" >"$WORK/out/kernel-release"
chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}\n' >"$WORK/out/packages.txt"
echo "$HASH" >"$WORK/out/inputs.sha256"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
say "$IMAGE image ready in $(($(date +%s) - t0))s: $OUT ($size_mb MiB, kernel $kver)"
