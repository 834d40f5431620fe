#!/usr/bin/env bash
# Host setup for the Vagrant lab (vagrant/Vagrantfile), as root, idempotent:
#
#   vagrant/install-host.sh
#
# Installs Vagrant, vagrant-libvirt, libvirt's system daemon and QEMU from Debian's
# packages (apt), plus what vagrant/build-box.sh needs (mmdebstrap, qemu-utils, rsync),
# and makes sure libvirtd (and virtlogd, which its QEMU driver logs through) runs.
#
# The lab's VMs use QEMU user-mode networking only, so libvirt's "default" NAT network
# (a virbr0 bridge with dnsmasq) is not wanted: it is no longer autostarted, and if it is
# running it is stopped. Nothing else of libvirt's configuration is changed.
set -euo pipefail

say() { printf '[install-host] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, libvirtd)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian (12 or newer) only"

PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  mmdebstrap e2fsprogs rsync openssh-client)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (apt, a few minutes)"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}" |
    grep -E '^(Setting up|E:)' | sed -u 's/^/[apt] /' >&2 || true
  for p in "${missing[@]}"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
      die "apt-get could not install $p"
  done
else
  say "packages already installed: ${PACKAGES[*]}"
fi
say "vagrant $(vagrant --version 2>/dev/null | awk '{print $2}'), vagrant-libvirt $(dpkg-query -W -f '${Version}' vagrant-libvirt)"

# No NAT bridge: the default network must not come up with the daemon.
rm -f /etc/libvirt/qemu/networks/autostart/default.xml

# The daemons: through the init system when there is one, else started directly (e.g. in a
# container whose PID 1 is not an init system).
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ -d /run/systemd/system ]; then
  systemctl enable --now virtlogd.socket libvirtd.service >/dev/null 2>&1 || systemctl start libvirtd
else
  if ! running /run/virtlogd.pid; then
    say "starting virtlogd"
    virtlogd -d
  fi
  if ! running /run/libvirtd.pid; then
    say "starting libvirtd"
    libvirtd -d
  fi
fi
for _ in $(seq 30); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 1
done
virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer on qemu:///system (see journalctl -u libvirtd or /var/log/libvirt/)"
if virsh -c qemu:///system net-info default 2>/dev/null | grep -q '^Active: *yes'; then
  say "stopping libvirt's default NAT network (the lab uses user-mode networking only)"
  virsh -c qemu:///system net-destroy default >/dev/null
fi
virsh -c qemu:///system net-autostart --disable default >/dev/null 2>&1 || true
say "libvirtd is running ($(virsh -c qemu:///system version | awk '/Running hypervisor/ {print $3, $4}'))"
