# Sourced by the image scripts: picks the container engine and makes it work on this host.
#   ENGINE            docker when its daemon answers, else podman (installed from the distribution's apt when
#                     missing and this shell is root); set ENGINE=podman|docker to choose.
#   CONTAINERS_CONF   podman only: a project-local containers.conf (.image/containers.conf) with the host
#                     fixes podman needs where there is no systemd and root cannot raise its limits.
# Everything podman writes for the project (the config, the stand-in base rootfs) lives under .image/.
IMAGE_STATE="${IMAGE_STATE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.image}"
mkdir -p "$IMAGE_STATE"

podman_packages=(podman buildah debootstrap runc iptables fuse-overlayfs slirp4netns uidmap netavark aardvark-dns catatonit)

install_podman() {
    # netavark needs iptables ("netavark: No such file or directory" without it); runc: see write_containers_conf.
    local missing=()
    for tool in podman buildah debootstrap runc iptables netavark; do
        command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/lib/podman/$tool" ]] || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "image: no working docker and podman is missing (${missing[*]}): install ${podman_packages[*]}" >&2
        return 2
    fi
    echo "image: installing podman & friends from apt (${missing[*]} missing)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${podman_packages[@]}"; } \
        >"$IMAGE_STATE/apt.log" 2>&1 || { tail -20 "$IMAGE_STATE/apt.log" >&2; return 1; }
}

write_containers_conf() {
    # Three host fixes, measured on a root, systemd-less, hybrid cgroup v1+v2 host (see docs/containers.md):
    # crun refuses that cgroup layout (runc runs), no systemd for the cgroup manager, and root cannot raise
    # nofile/nproc above the current hard limits, which podman tries by default.
    local conf="$IMAGE_STATE/containers.conf" nofile nproc runtime=crun manager=systemd
    # nproc: 32768 at most; runc was refused its shell's own hard limit (96369) on such a host, EPERM.
    nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
    [[ "$nofile" == unlimited || "$nofile" -gt 65536 ]] && nofile=65536
    [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
    command -v runc >/dev/null 2>&1 && runtime=runc
    [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]] || manager=cgroupfs
    cat > "$conf.tmp" <<CONF
# Written by docker/engine.sh for this host; podman reads it through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "$runtime"
cgroup_manager = "$manager"
CONF
    mv "$conf.tmp" "$conf"
    export CONTAINERS_CONF="$conf"
    # buildah 1.28 does not apply default_ulimits to a build's RUN steps: build.sh passes these.
    PODMAN_ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
}

pick_engine() {
    if [[ -z "${ENGINE:-}" ]]; then
        if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
            ENGINE=docker
        else
            command -v docker >/dev/null 2>&1 && echo "image: docker's CLI is here but no daemon answers: using podman" >&2
            ENGINE=podman
        fi
    fi
    if [[ "$ENGINE" == podman ]]; then
        install_podman || return $?
        write_containers_conf
    fi
    export ENGINE
}

# The host's CA bundle, mounted over the container's during builds and runs: pip then trusts what the host
# trusts (a TLS-inspecting proxy's CA included). Podman only: `docker build` has no --volume.
host_ca_volume() {
    local ca=/etc/ssl/certs/ca-certificates.crt
    if [[ "$ENGINE" == podman && -f "$ca" ]]; then
        printf -- '--volume=%s:%s:ro' "$ca" "$ca"
    fi
}
