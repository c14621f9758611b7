#!/usr/bin/env bash
# Build a stand-in for the official Python base image from Debian packages, for a machine that cannot pull
# it (no registry reachable), and tag it with the base's name, so the Dockerfiles build unmodified:
#
#   docker/make-base.sh python:3.11-slim-bookworm
#
# A debootstrap'ed Debian bookworm (minbase) with Debian's python3 (3.11, the same minor version as the
# official image), python3-dev (DeepSpeed's ops compile against Python.h) and a venv on PATH at /opt/venv
# (Debian's system pip refuses installs, PEP 668). It is NOT the official image: Debian's Python and its
# standard library's pydoc text differ slightly (the demo's corpus has a few more blocks).
# Settings: DEBIAN_MIRROR (default: the first Debian URI of this host's apt sources, else deb.debian.org).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=docker/engine.sh
source "$here/engine.sh"
pick_engine

base="${1:?usage: $0 IMAGE_NAME (the FROM line of the Dockerfile, e.g. python:3.11-slim-bookworm)}"
if [[ "$base" != python:3.11*bookworm* ]]; then
    echo "make-base.sh: can only stand in for python:3.11-*bookworm (Debian bookworm's Python is 3.11), not $base" >&2
    exit 2
fi
# Fully qualified, as docker and podman name what they would have pulled.
ref="docker.io/library/$base"
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -rhoE 'https?://[^ ]*/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs="$IMAGE_STATE/base-rootfs"
rm -rf "$rootfs"
echo "make-base.sh: $base cannot be pulled here: building a stand-in from Debian bookworm packages ($mirror)" >&2
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,g++,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$IMAGE_STATE/debootstrap.log" 2>&1 \
    || { tail -20 "$IMAGE_STATE/debootstrap.log" >&2; exit 1; }
chroot "$rootfs" python3 -m venv /opt/venv
chroot "$rootfs" /opt/venv/bin/pip --version >/dev/null
rm -rf "$rootfs/var/lib/apt/lists/"* "$rootfs/var/cache/apt/archives/"*.deb
tar -C "$rootfs" -c . | $ENGINE import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "stand-in for $base: Debian bookworm python3 + venv (docker/make-base.sh)" \
    - "$ref" >/dev/null
rm -rf "$rootfs"
echo "make-base.sh: tagged $ref (a stand-in, $((SECONDS - start)) s)" >&2
