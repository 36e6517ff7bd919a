#!/usr/bin/env bash
# Debian packages FFCV needs at build and run time (STACK-NOTES.md): pkg-config, libturbojpeg, OpenCV.
# Installs them when missing, as root or through sudo; otherwise says what to install and fails.
set -euo pipefail
packages=(pkg-config libturbojpeg0-dev libopencv-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "FFCV needs: apt-get install ${missing[*]} (run as root), or use EXTRAS=dev to skip FFCV" >&2; exit 1
fi
echo "installing system libraries for FFCV: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
