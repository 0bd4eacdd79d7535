#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for machines that cannot pull from an image
# registry (ours: no registry is reachable, the package mirrors are). Only the tests build
# FROM it; the published images keep the official base (BASE_IMAGE's default in the Dockerfile).
#
#   containers/test-base.sh [IMAGE]     (default panoptic-test-base:bookworm; needs root)
#
# Debian bookworm (minbase) from debootstrap, Python 3.11 with `python` and `pip` on PATH from a
# venv in /usr/local/py, as the official image has them in /usr/local/bin. The CA certificates
# this machine adds to Debian's (its TLS-intercepting egress) go into this base only, so pip in
# a build can reach the package index; a published image never carries them.
#
# Cached: the image itself (kept while it exists) and the debootstrap root as a tarball in
# $PANOPTIC_CACHE_DIR (default /var/cache/panoptic), so a pruned engine rebuilds it in seconds.
set -euo pipefail
IMAGE=${1:-panoptic-test-base:bookworm}
CACHE=${PANOPTIC_CACHE_DIR:-/var/cache/panoptic}
ROOTFS_TAR=$CACHE/debootstrap-bookworm-minbase.tar
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "test base $IMAGE: present"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$ROOTFS_TAR" ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }
  work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  t0=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
  tar -C "$work/root" -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  echo "debootstrap: $(( $(date +%s) - t0 )) s -> $ROOTFS_TAR"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx" ${work:+"$work"}' EXIT
docker import - panoptic-test-rootfs:bookworm <"$ROOTFS_TAR" >/dev/null
mkdir -p "$ctx/ca"
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
cat >"$ctx/Dockerfile" <<'EOF'
FROM panoptic-test-rootfs:bookworm
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null 2>&1 \
    && python3 -m venv /usr/local/py \
    && /usr/local/py/bin/pip --version
ENV PATH=/usr/local/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
docker build --network host -q -t "$IMAGE" "$ctx" >/dev/null
docker image rm panoptic-test-rootfs:bookworm >/dev/null 2>&1 || true
echo "test base $IMAGE: built ($(docker run --rm "$IMAGE" python --version))"
