#!/usr/bin/env bash
# Install the Debian packages the integration tests need (Open MPI for mpi4py, a
# single-host SLURM with munge). Idempotent: a fast no-op when everything is present.
# Run as root (or with sudo available). Debian's policy-rc.d keeps the services from
# starting on install; tests/integration/slurm_cluster.py starts its own daemons.
set -euo pipefail

PKGS=(openmpi-bin libopenmpi-dev slurm-wlm slurmctld slurmd munge)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup_system: all packages present (${PKGS[*]})" >&2
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "setup_system: need root to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "setup_system: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup_system: done" >&2
