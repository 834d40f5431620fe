#!/usr/bin/env bash
# The Vagrant lab (vagrant/Vagrantfile) with progress and time limits, as root:
#
#   vagrant/lab.sh up [--timeout SECS]              build/check the box, vagrant up (+ install)
#   vagrant/lab.sh test [--timeout SECS] [PYTEST ARGS]   kernel tests in the VM (default tests/kernel -q)
#   vagrant/lab.sh selftest [--timeout SECS]        doctor + meshaccel selftest in the VM
#   vagrant/lab.sh demo [--timeout SECS]            scripts/demo.sh in the VM (see provision.sh)
#   vagrant/lab.sh run [--timeout SECS] [PYTEST ARGS]    up, test, destroy (also on failure)
#   vagrant/lab.sh ssh | status                     vagrant ssh / vagrant status + the domain
#   vagrant/lab.sh destroy                          vagrant destroy -f (the VM, its disk, its console log)
#   vagrant/lab.sh purge                            destroy, and remove the cached box too
#
# Each step runs under `timeout`: `up` (default 1200 s: box check, boot under TCG, install),
# `test` (default 5400 s; the suite took 32-49 minutes under TCG), selftest/demo (900 s).
# When a step runs out of time, the last lines of the VM's serial console are printed,
# the VM is destroyed (a VM that hangs does not stay around), and this exits 124.
# MESHACCEL_LAB_SUITE, MESHACCEL_LAB_SSH_PORT: see the Vagrantfile.
set -euo pipefail

say() { printf '[lab] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=${MESHACCEL_LAB_SUITE:-bookworm}
PORT=${MESHACCEL_LAB_SSH_PORT:-2522}
CONSOLE=$HERE/.vagrant/console-$SUITE.log
DOMAIN=meshaccel-lab-$SUITE
export MESHACCEL_LAB_SUITE=$SUITE MESHACCEL_LAB_SSH_PORT=$PORT

cmd=${1:-}
[ $# -eq 0 ] || shift
TIMEOUT=
if [ "${1:-}" = --timeout ]; then
  [[ ${2:-} =~ ^[0-9]+$ ]] || die "--timeout takes a number of seconds"
  TIMEOUT=$2
  shift 2
fi

[ "$(id -u)" = 0 ] || die "must run as root (libvirt's system daemon, the box build)"
command -v vagrant >/dev/null && vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt ||
  die "vagrant or vagrant-libvirt missing: run vagrant/install-host.sh first"
cd "$HERE"

# Vagrant's progress bars (\r-separated) as one line per 10%; line by line as it comes
filter() {
  local line p last=-10
  stdbuf -oL tr '\r' '\n' | while IFS= read -r line; do
    if [[ $line =~ Progress:\ ([0-9]+)% ]]; then
      p=${BASH_REMATCH[1]}
      if [ "$p" -ge $((last + 10)) ]; then echo "    progress $p%"; last=$p; fi
    else
      last=-10
      printf '%s\n' "$line"
    fi
  done
}

state() { vagrant status --machine-readable 2>/dev/null | awk -F, '$3 == "state" { print $4 }' | head -n 1; }

console_tail() {
  if [ -s "$CONSOLE" ]; then
    say "last lines of the VM's serial console ($CONSOLE):"
    tail -n 25 "$CONSOLE" | sed 's/^/[console] /' >&2
  fi
}

destroy() {
  say "destroying the VM ($DOMAIN)"
  timeout 300 vagrant destroy -f 2>&1 | filter >&2 || true
  if virsh -c qemu:///system dominfo "$DOMAIN" >/dev/null 2>&1; then
    # vagrant lost track of it (e.g. killed mid-`up`): remove only this lab's domain and disk
    say "vagrant did not remove $DOMAIN: removing it with virsh"
    virsh -c qemu:///system destroy "$DOMAIN" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$DOMAIN" --remove-all-storage >/dev/null 2>&1 || true
  fi
  rm -f "$CONSOLE"
}

# run SECS DESCRIPTION COMMAND...: the command under timeout; on timeout, report and destroy
bounded() {
  local secs=$1 what=$2 rc=0 t0=$SECONDS
  shift 2
  say "$what (time limit ${secs}s)"
  timeout --kill-after=30 "$secs" "$@" 2> >(filter >&2) | filter || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "error: $what did not finish in ${secs}s"
    console_tail
    destroy
    exit 124
  fi
  say "$what: exit $rc after $((SECONDS - t0))s"
  return "$rc"
}

in_vm() { # in_vm SECS COMMAND ARGS: provision.sh COMMAND ARGS in the VM, as root
  local secs=$1 q
  shift
  [ "$(state)" = running ] || die "the VM is not running (state: $(state)): vagrant/lab.sh up first"
  bounded 300 "copying the checkout into the VM (vagrant rsync)" vagrant rsync
  q=$(printf '%q ' "$@")
  bounded "$secs" "provision.sh $1 in the VM" \
    vagrant ssh -c "sudo /meshaccel/vagrant/provision.sh $q" -- -o ServerAliveInterval=30 -o ServerAliveCountMax=10
}

up() {
  "$HERE/build-box.sh" "$SUITE"
  if [ "$(state)" != running ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "127.0.0.1:$PORT is already in use: set MESHACCEL_LAB_SSH_PORT to a free port"
  fi
  MESHACCEL_LAB_BOX_CHECKED=1 bounded "${TIMEOUT:-1200}" "vagrant up ($SUITE, TCG; boot takes 1-3 minutes, then meshaccel is installed)" \
    vagrant up --provider=libvirt
}

main() {
case "$cmd" in
  up) up ;;
  test) in_vm "${TIMEOUT:-5400}" test "$@" ;;
  selftest) in_vm "${TIMEOUT:-900}" selftest "$@" ;;
  demo) in_vm "${TIMEOUT:-900}" demo "$@" ;;
  run)
    trap destroy EXIT
    up
    in_vm "${TIMEOUT:-5400}" test "$@"
    ;;
  ssh) exec vagrant ssh "$@" ;;
  status)
    vagrant status
    virsh -c qemu:///system list --all | grep -E "Name|$DOMAIN" || true
    ;;
  destroy) destroy ;;
  purge)
    destroy
    vagrant box remove --force --all "meshaccel/$SUITE" 2>/dev/null || true
    for vol in $(virsh -c qemu:///system vol-list --pool default 2>/dev/null |
      awk -v p="meshaccel-VAGRANTSLASH-${SUITE}_vagrant_box_image_0_" 'index($1, p) == 1 { print $1 }'); do
      virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null && say "deleted libvirt volume $vol"
    done
    rm -rf "${MESHACCEL_VM_CACHE:-/var/cache/meshaccel-vm}/box-$SUITE"
    say "box meshaccel/$SUITE removed (vagrant/build-box.sh builds it again)"
    ;;
  *) sed -n '2,19p' "$0" >&2; exit 2 ;;
esac
}
# (all parsed before anything runs: editing this file during a long `test` is harmless)
main "$@"
exit
