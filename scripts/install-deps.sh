#!/usr/bin/env bash
# Installs everything the fabric needs on a Debian 12 machine, as root: the Debian packages
# (etcd, FRR, BIRD, iproute2, the reference CNI plugins) and a virtualenv .venv holding the
# project with its test extras. Idempotent and quick when everything is already there.
#
# Installing etcd-server, frr, bird2 or podman enables (and with systemd starts) their
# system-wide daemons, sockets and timers. The lab and the tests start their own instances,
# so this script keeps package maintainer scripts from starting anything (policy-rc.d) and
# afterwards disables (and with systemd stops) every one of those units that was not enabled
# before it ran; without systemd running, `systemctl disable` edits the links offline.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

PKGS=(etcd-server etcd-client iproute2 iputils-ping frr bird2 containernetworking-plugins
      iptables nftables procps psmisc python3-venv python3-pip graphviz
      podman runc busybox-static iperf3 gcc libc6-dev)
# gcc, libc6-dev: `fabricctl cni install` builds the CNI plugins' compiled front (cni/front.c)
# podman, runc, busybox-static: tests/lab/test_podman.py (a real CNI runtime; runc because
# crun fails on hybrid cgroups). iperf3: the policy benchmark's pod-to-pod throughput (its
# package ships iperf3.service, disabled below like the others). Sockets and timers first:
# they would start their services.
UNITS=(etcd.service frr.service bird.service podman.socket podman-auto-update.timer
       podman.service podman-restart.service podman-auto-update.service iperf3.service)

log() { printf '[deps] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: must run as root (apt-get and network namespaces need it)" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  have_systemd=0
  [ -d /run/systemd/system ] && have_systemd=1
  have_systemctl=0
  command -v systemctl >/dev/null 2>&1 && have_systemctl=1
  declare -A was_enabled=()
  if [ $have_systemctl -eq 1 ]; then
    for u in "${UNITS[@]}"; do
      systemctl is-enabled --quiet "$u" 2>/dev/null && was_enabled[$u]=1 || true
    done
  fi
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by fabric install-deps.sh while it installs packages\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_created=1
  fi
  trap '[ $policy_created -eq 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $have_systemctl -eq 1 ]; then
    for u in "${UNITS[@]}"; do
      if [ -z "${was_enabled[$u]:-}" ] && systemctl list-unit-files "$u" >/dev/null 2>&1; then
        if [ $have_systemd -eq 1 ]; then
          systemctl disable --now "$u" >/dev/null 2>&1 || true
        else
          systemctl disable "$u" >/dev/null 2>&1 || true
        fi
      fi
    done
  fi
else
  log "Debian packages present"
fi

# The venv: rebuilt only when pyproject.toml changed since the last install.
PY=${PYTHON:-python3}
stamp=.venv/.fabric-deps-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "building .venv with $PY"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
else
  log ".venv up to date"
fi
