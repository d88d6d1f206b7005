#!/usr/bin/env bash
# The wheels the images install, fetched on the host by pip (so a build runs with no network and
# no registry: the Dockerfiles install with --no-index from these folders):
#   out/docker/wheels/worker  the project's runtime dependencies with the service and ray extras,
#                             at requirements.lock's versions: what a job needs, no dev packages
#   out/docker/wheels/api     docker/requirements-api.txt: the service, Ray and the CPU build of torch
#   out/docker/wheels/build   setuptools, to build the project's wheel in the images' build stage
# Each folder is fetched again only when its inputs change (a stamp of their checksums).
#
# pip runs on this host for the images' Python (3.11, Linux x86_64, glibc >= 2.28: the wheels
# are manylinux). PyPI's Linux torch is a CUDA build; the API's torch==2.13.0+cpu is not on PyPI:
# here pip finds it on this machine's disk (/etc/xdg/pip, PIP_FIND_LINKS=/opt/wheels); elsewhere
# point pip at it, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
read -r -a PIP <<< "${PIP:-python3.11 -m pip}"  # a command line: the pip of a Python 3.11
WHEELS=out/docker/wheels
mkdir -p "$WHEELS"

fetch() {  # fetch NAME INPUT... -- PIP-DOWNLOAD-ARGS...
    local name=$1 inputs=() stamp
    shift
    while [[ $1 != -- ]]; do inputs+=("$1"); shift; done
    shift
    stamp=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)
    if [[ -f $WHEELS/$name/.stamp && $(cat "$WHEELS/$name/.stamp") == "$stamp" ]]; then
        echo "wheels/$name: up to date"
        return
    fi
    rm -rf "${WHEELS:?}/$name"
    nice -n 10 "${PIP[@]}" download --quiet --disable-pip-version-check --only-binary :all: \
        -d "$WHEELS/$name" "$@" 2> >(grep -v "WARNING: Location" >&2)
    echo "$stamp" > "$WHEELS/$name/.stamp"
    echo "wheels/$name: $(find "$WHEELS/$name" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS/$name" | cut -f1)"
}

# The project's requirements (not the whole pyproject.toml: an edit elsewhere in it changes no wheel)
python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["service"] + p["optional-dependencies"]["ray"]))' \
    > "$WHEELS/project-requirements.txt"
fetch worker requirements.lock "$WHEELS/project-requirements.txt" -- \
    -c requirements.lock -r "$WHEELS/project-requirements.txt"
# The lock pins the CUDA build of torch; the API takes the CPU build instead (see the file).
grep -v -E '^(torch|torchvision)==' requirements.lock > "$WHEELS/api-constraints.txt"
fetch api requirements.lock docker/requirements-api.txt -- \
    -c "$WHEELS/api-constraints.txt" -r docker/requirements-api.txt
fetch build "$WHEELS/project-requirements.txt" -- "setuptools>=69"
