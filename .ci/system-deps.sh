#!/usr/bin/env bash
# Debian packages the project needs beyond Python (STACK-NOTES.md), by what they are for:
#   ffcv     pkg-config, libturbojpeg, OpenCV: FFCV builds and runs against them
#   cluster  SLURM 22.05 (slurmctld, slurmd, slurm-client) and munge: tests/test_clusters.py starts a one-node
#            SLURM cluster from them (its own config, key and sockets in a temporary folder; no system service)
# Usage: bash .ci/system-deps.sh [group ...]   (no group: all of them)
# Installs the missing ones, as root or through sudo; otherwise says what to install and fails.
set -euo pipefail
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(ffcv cluster)
packages=()
for group in "${groups[@]}"; do
  case "$group" in
    ffcv) packages+=(pkg-config libturbojpeg0-dev libopencv-dev) ;;
    cluster) packages+=(slurmctld slurmd slurm-client munge) ;;
    *) echo "system-deps: unknown group '$group' (ffcv, cluster)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "needs: apt-get install ${missing[*]} (run as root), or use EXTRAS=dev to skip FFCV and the SLURM tests" >&2
  exit 1
fi
echo "installing system packages (${groups[*]}): ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
