#!/usr/bin/env bash
# Build an image with docker or podman, whichever works here (`make image` = docker/build.sh cpu):
#
#   docker/build.sh cpu     # docker/Dockerfile.cpu -> distclm:cpu
#   docker/build.sh gpu     # docker/Dockerfile.gpu -> distclm:gpu (PyPI's CUDA torch; builds without a GPU)
#
# When the Dockerfile's base image cannot be pulled (no registry reachable), docker/make-base.sh builds a
# stand-in from Debian packages under the same name. Where torch comes from is a build argument, never an
# edit of the Dockerfile:
#   TORCH_INDEX_URL   pip index for torch (cpu: PyTorch's CPU index; gpu: PyPI)
#   TORCH_WHEELS      a local folder of torch wheels, mounted into the build (podman) and searched first;
#                     default for cpu when PyTorch's index is unreachable: pip's own find-links folder here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=docker/engine.sh
source "$here/engine.sh"
pick_engine

flavour="${1:-cpu}"
case "$flavour" in
    cpu) dockerfile="$here/Dockerfile.cpu"; tag="${IMAGE_TAG:-distclm:cpu}" ;;
    gpu) dockerfile="$here/Dockerfile.gpu"; tag="${IMAGE_TAG:-distclm:gpu}" ;;
    *) echo "build.sh: unknown flavour $flavour (cpu|gpu)" >&2; exit 2 ;;
esac
base="$(awk 'toupper($1) == "FROM" {print $2; exit}' "$dockerfile")"

reachable() { python3 - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=10)
PY
}

if ! $ENGINE image inspect "$base" >/dev/null 2>&1; then
    echo "build.sh: pulling $base" >&2
    if ! timeout 120 $ENGINE pull -q "$base" >/dev/null 2>&1; then
        "$here/make-base.sh" "$base"
    fi
fi

args=(--build-arg "TORCH_VERSION=$(sed -n 's/^torch==//p' "$repo/constraints.txt")")
volumes=()
ca="$(host_ca_volume)"; [[ -n "$ca" ]] && volumes+=("$ca")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi
if [[ "$flavour" == cpu && -z "${TORCH_WHEELS:-}" && -z "${TORCH_INDEX_URL:-}" ]] \
        && ! reachable https://download.pytorch.org/whl/cpu/torch/; then
    # PyPI has no CPU-only torch for Linux (its torch is the CUDA build, ~2.7 GB with its libraries).
    TORCH_WHEELS="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
    TORCH_WHEELS="${TORCH_WHEELS%% *}"
    if ! compgen -G "${TORCH_WHEELS:-/nonexistent}/torch-*+cpu-*.whl" >/dev/null; then
        echo "build.sh: download.pytorch.org is unreachable and no local torch CPU wheel was found: set" \
             "TORCH_WHEELS=<folder with torch-X+cpu-*.whl> or TORCH_INDEX_URL=<an index with torch's CPU build>" >&2
        exit 2
    fi
    echo "build.sh: download.pytorch.org is unreachable: torch from the local wheel folder $TORCH_WHEELS" >&2
    args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
fi
if [[ -n "${TORCH_WHEELS:-}" ]]; then
    if [[ "$ENGINE" != podman ]]; then
        echo "build.sh: TORCH_WHEELS needs podman (docker build cannot mount a folder): set TORCH_INDEX_URL" >&2
        exit 2
    fi
    volumes+=("--volume=$(cd "$TORCH_WHEELS" && pwd):/wheels:ro")
    args+=(--build-arg "TORCH_FIND_LINKS=/wheels")
fi
pull=()
if [[ "$ENGINE" == podman ]]; then
    # buildah 1.28 does not apply containers.conf's default_ulimits to RUN steps (engine.sh).
    pull=(--pull=never "${PODMAN_ULIMITS[@]}")
fi

echo "build.sh: $ENGINE build -f ${dockerfile#"$repo"/} -t $tag" >&2
start=$SECONDS
$ENGINE build "${pull[@]}" "${volumes[@]}" "${args[@]}" -f "$dockerfile" -t "$tag" "$repo"
size="$($ENGINE image inspect --format '{{.Size}}' "$tag")"
echo "build.sh: built $tag in $((SECONDS - start)) s, $((size / 1000000)) MB" >&2
