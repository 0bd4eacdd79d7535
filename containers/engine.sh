#!/usr/bin/env bash
# Makes sure a Docker engine answers, for the tests that build and run our images.
# Installs Debian's docker.io (and debootstrap, for containers/test-base.sh) when they are
# missing and this runs as root, and starts dockerd when none runs. On machines without a
# bridge network (ours) the daemon runs with --bridge=none: builds and containers then use
# the host's network (--network host), which the tests ask for.
set -euo pipefail
LOG=${DOCKERD_LOG:-/var/log/panoptic-dockerd.log}

if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers and this is not root: install Docker (and debootstrap), or run as root" >&2
    exit 1
  fi
  echo "installing docker.io and debootstrap (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! pgrep -x dockerd >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "dockerd is not running; start it (as root) or ask an admin" >&2; exit 1; }
  echo "starting dockerd (log: $LOG)"
  nohup dockerd --iptables=false --bridge=none >"$LOG" 2>&1 &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within 60 s; see $LOG" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
