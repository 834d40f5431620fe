#!/usr/bin/env bash
# Builds, once per set of inputs, the Vagrant box of the lab (vagrant/Vagrantfile) and adds
# it to Vagrant as meshaccel/SUITE (libvirt provider):
#
#   vagrant/build-box.sh [--rebuild] [SUITE]        (root; default: bookworm)
#
# Boxes cannot be downloaded here, so the box comes from Debian's packages: the image of
# vagrant/build-image.sh (its cached rootfs.ext4, built first if needed: the suite's own
# kernel + headers, python3-bpfcc, bpftool, the tests' Python modules), copied and given
# what Vagrant needs: systemd as init, openssh-server, sudo, rsync, DHCP on eth0 through
# systemd-networkd, and a `vagrant` user with sudo without password and Vagrant's
# insecure public key (Vagrant replaces it with a key of its own on the first `up`).
# Then qcow2 -> box (metadata.json, Vagrantfile, box.img) -> `vagrant box add`.
#
# The disk has no bootloader: the Vagrantfile boots the image's kernel and initrd directly
# (libvirt kernel/initrd/cmdline), from $MESHACCEL_VM_CACHE/box-SUITE/{vmlinuz,initrd.img}.
#
# Output, under $MESHACCEL_VM_CACHE (default /var/cache/meshaccel-vm, outside the repo):
#   box-SUITE/vmlinuz, initrd.img, kernel-release   the kernel the Vagrantfile boots
#   box-SUITE/inputs.sha256   hash of this script and the image's own inputs hash: the
#                             box is rebuilt (and re-added) only when it changes
# Vagrant keeps the added box under ~/.vagrant.d/boxes; vagrant-libvirt copies it once
# into libvirt's "default" storage pool as meshaccel-VAGRANTSLASH-SUITE_vagrant_box_image_0_*
# (a rebuild deletes those volumes; the lab's VM must not exist then). `vagrant/lab.sh purge`
# removes all of it.
set -euo pipefail

say() { printf '[build-box] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

REBUILD=0
SUITE=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) REBUILD=1 ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) SUITE=$1 ;;
  esac
  shift
done
[[ $SUITE =~ ^[a-z]+(-[0-9]+\.[0-9]+\.[0-9]+-[0-9]+)?$ ]] || die "SUITE must be a Debian codename (e.g. bookworm) or CODENAME-ABI"
[ "$(id -u)" = 0 ] || die "must run as root (mount, chroot, apt-get in the image)"
for c in vagrant virsh qemu-img mount chroot; do
  command -v "$c" >/dev/null || die "$c not found: run vagrant/install-host.sh first"
done

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${MESHACCEL_VM_CACHE:-/var/cache/meshaccel-vm}
BOX=meshaccel/$SUITE
OUT=$CACHE/box-$SUITE
# The pool volumes vagrant-libvirt makes from the box (version 0: added from a file; then
# the box's timestamp).
VOLUMES=meshaccel-VAGRANTSLASH-${SUITE}_vagrant_box_image_0_
# What the box adds to the image.
# python3-wheel: pip builds the editable install offline; python3-hypothesis: kernel tests
# that vagrant/build-image.sh's list lacks (tests/kernel/test_iptables_accepts.py).
EXTRA=(systemd-sysv openssh-server sudo rsync dbus libpam-systemd python3-wheel python3-hypothesis)

"$HERE/build-image.sh" "$SUITE"
IMG=$CACHE/$SUITE
HASH=$( {
  cat "$0"
  cat "$IMG/inputs.sha256"
  printf '%s\n' "$SUITE" "${EXTRA[@]}"
} | sha256sum | cut -d' ' -f1)

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-box-$SUITE"
flock 9

box_added() { vagrant box list 2>/dev/null | grep -q "^$BOX \+(libvirt"; }
if [ "$REBUILD" = 0 ] && box_added && [ -f "$OUT/vmlinuz" ] &&
  [ "$(cat "$OUT/inputs.sha256" 2>/dev/null)" = "$HASH" ]; then
  say "box $BOX is up to date (kernel $(cat "$OUT/kernel-release"))"
  exit 0
fi

if virsh -c qemu:///system dominfo "meshaccel-lab-$SUITE" >/dev/null 2>&1; then
  # its disk is a snapshot of the box's volume: the box cannot change under it
  [ "$REBUILD" = 0 ] || die "the lab's VM meshaccel-lab-$SUITE uses the box: vagrant/lab.sh destroy first"
  say "warning: box $BOX is out of date (its inputs changed), kept while the lab's VM exists: vagrant/lab.sh destroy, then up, to rebuild it"
  exit 0
fi
t0=$(date +%s)
WORK=$(mktemp -d "$CACHE/.build-box-$SUITE.XXXXXX")
ROOT=$WORK/root
cleanup() {
  for m in dev/pts dev proc sys; do
    mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
  done
  mountpoint -q "$ROOT" 2>/dev/null && umount "$ROOT"
  rm -rf "$WORK"
}
trap cleanup EXIT

say "copying the $SUITE image ($IMG/rootfs.ext4)"
cp --sparse=always "$IMG/rootfs.ext4" "$WORK/disk.ext4"
mkdir "$ROOT"
mount -o loop "$WORK/disk.ext4" "$ROOT"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"

say "installing ${EXTRA[*]} into the image (apt, from the image's own suite)"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" # no service starts in the chroot
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
chroot "$ROOT" apt-get update -qq
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${EXTRA[@]}" |
  grep -E '^(Setting up|E:)' | sed -u 's/^/[apt] /' >&2 || true
for p in "${EXTRA[@]}"; do
  chroot "$ROOT" dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    die "could not install $p into the image"
done
rm -f "$ROOT/usr/sbin/policy-rc.d" "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
: >"$ROOT/etc/resolv.conf"

say "configuring the vagrant user, ssh and networking"
chroot "$ROOT" sh -ec '
  id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo vagrant
  echo vagrant:vagrant | chpasswd
  install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
'
install -m 600 /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub "$ROOT/home/vagrant/.ssh/authorized_keys" 2>/dev/null ||
  die "Vagrant's insecure public key not found (keys/vagrant.pub of the vagrant gem)"
chroot "$ROOT" chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/vagrant"
chmod 440 "$ROOT/etc/sudoers.d/vagrant"
printf 'UseDNS no\n' >"$ROOT/etc/ssh/sshd_config.d/vagrant.conf"
echo meshaccel-lab >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 meshaccel-lab\n' >"$ROOT/etc/hosts"
# QEMU user-mode networking: DHCP from QEMU's slirp (10.0.2.15, no route to the host's LAN).
mkdir -p "$ROOT/etc/systemd/network"
printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$ROOT/etc/systemd/network/10-eth0.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$ROOT/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/ssh.service "$ROOT/etc/systemd/system/multi-user.target.wants/ssh.service"
# No waiting for "network online" under emulation; no timers doing work while tests run.
rm -f "$ROOT/etc/systemd/system/timers.target.wants/"*
chroot "$ROOT" systemctl mask apt-daily.timer apt-daily-upgrade.timer systemd-networkd-wait-online.service >/dev/null 2>&1 || true
kver=$(cat "$IMG/kernel-release")

for m in dev/pts dev proc sys; do umount "$ROOT/$m"; done
umount "$ROOT"
e2fsck -fy "$WORK/disk.ext4" >/dev/null || true

say "converting to qcow2"
mkdir "$WORK/box"
qemu-img convert -O qcow2 "$WORK/disk.ext4" "$WORK/box/box.img"
rm -f "$WORK/disk.ext4"
vsize=$(( ($(stat -c %s "$IMG/rootfs.ext4") + 1073741823) / 1073741824 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$vsize" >"$WORK/box/metadata.json"
cat >"$WORK/box/Vagrantfile" <<'EOF'
# meshaccel lab box (vagrant/build-box.sh): the disk has no bootloader; the lab's
# Vagrantfile boots the image's kernel with libvirt kernel/initrd/cmdline.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
  end
end
EOF
tar -C "$WORK/box" -cf "$WORK/box.tar" metadata.json Vagrantfile box.img

say "adding the box to Vagrant as $BOX"
if box_added; then vagrant box remove --force --all "$BOX" >/dev/null; fi
for vol in $(virsh -c qemu:///system vol-list --pool default 2>/dev/null | awk -v p="$VOLUMES" 'index($1, p) == 1 { print $1 }'); do
  say "deleting the previous box's libvirt volume $vol"
  virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null
done
vagrant box add --force --name "$BOX" "$WORK/box.tar" 2>&1 | sed -u 's/^/[vagrant] /' >&2

mkdir -p "$OUT"
install -m 644 "$IMG/vmlinuz" "$OUT/vmlinuz"
install -m 644 "$IMG/initrd.img" "$OUT/initrd.img"
echo "$kver" >"$OUT/kernel-release"
echo "$HASH" >"$OUT/inputs.sha256"
say "box $BOX ready in $(($(date +%s) - t0))s (kernel $kver)"
