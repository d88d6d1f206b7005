#!/usr/bin/env bash
# Build the images with no registry and no network inside the build: the base from Debian's
# packages (build-base.sh), the wheels fetched on the host (wheels.sh), then
#   compress-api          the API (docker/Dockerfile.api)
#   compress-worker       a CPU node (docker/Dockerfile.worker)
#   compress-worker-cuda  a GPU node: the worker plus the NVIDIA runtime's settings
# each tagged :latest and :VERSION, labelled with the version and the source commit.
#   scripts/docker/build.sh                 # all three
#   scripts/docker/build.sh api worker      # some
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
IMAGES=("$@")
[[ ${#IMAGES[@]} -gt 0 ]] || IMAGES=(api worker worker-cuda)

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' compress/__init__.py)  # pyproject reads it there
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# a tree with uncommitted changes is not the commit: say so in the label
if [[ $COMMIT != unknown ]] && [[ -n $(git status --porcelain -- compress service recipes pyproject.toml docker 2>/dev/null) ]]; then
    COMMIT="$COMMIT-dirty"
fi

scripts/docker/build-base.sh
scripts/docker/wheels.sh

for name in "${IMAGES[@]}"; do
    start=$SECONDS
    # The context is a tar of what this Dockerfile copies, no more: the legacy builder would send
    # everything .dockerignore lets in (both images' wheels, 3.7 GB) to every build.
    wheels=()
    case $name in
        api) wheels=(out/docker/wheels/api out/docker/wheels/build) ;;
        worker) wheels=(out/docker/wheels/worker out/docker/wheels/build) ;;
    esac
    # --network host: the build's RUN steps need none (the wheels are in the context), and there
    # is no bridge network to give them. --force-rm: no stopped build containers left behind.
    tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md compress service \
            recipes docker "${wheels[@]}" \
        | nice -n 10 docker build --network host --force-rm -f "docker/Dockerfile.$name" \
            --build-arg "VERSION=$VERSION" --build-arg "SOURCE_COMMIT=$COMMIT" \
            -t "compress-$name:latest" -t "compress-$name:$VERSION" -
    echo "compress-$name built in $((SECONDS - start)) s"
done
# The build stages' images are dangling once the final image is tagged.
docker image prune --force --filter "dangling=true" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^compress-' || true
