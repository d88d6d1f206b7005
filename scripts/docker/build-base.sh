#!/usr/bin/env bash
# The images' base, built from Debian's packages with no image registry: debootstrap a minimal
# Debian 12 (bookworm) into out/docker/rootfs, add Python 3.11 (the project's Python) and the
# non-root user, and `docker import` the folder as compress-base:bookworm.
#
#   scripts/docker/build-base.sh            # skips the work when the image already exists
#   FORCE=1 scripts/docker/build-base.sh    # rebuild
#   DEBIAN_MIRROR=http://mirror/debian scripts/docker/build-base.sh
#
# Needs root (debootstrap, chroot) and a Docker engine.
set -euo pipefail

IMAGE=${BASE_IMAGE:-compress-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROOTFS=$ROOT/out/docker/rootfs

if [[ -z "${FORCE:-}" ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
# minbase: essential packages and apt only. python3 (3.11.2 on bookworm) and python3-venv
# (ensurepip, for the images' build stage); tini reaps children and forwards signals as PID 1
# (Ray and the service's job processes fork). No compilers, no docs.
nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,tini,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR"

# The user every image runs as (uid 1000), and /data, the service's volume, owned by it.
chroot "$ROOTFS" useradd --create-home --uid 1000 --shell /bin/sh compress
mkdir -p "$ROOTFS/data"
chroot "$ROOTFS" chown compress:compress /data
# What a running container never needs: package lists and caches, documentation, locales.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/*

VERSION=$(chroot "$ROOTFS" python3 -c 'import platform; print(platform.python_version())')
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/sh"]' \
    --message "debootstrap --variant=minbase bookworm + python3 $VERSION, python3-venv, tini" \
    - "$IMAGE"
rm -rf "$ROOTFS"
docker image ls "$IMAGE"
