#!/usr/bin/env bash
# The whole test suite: installs Debian dependencies, builds everything, fetches the
# Llama 3 tokenizer files (npm), and runs ctest (unit + integration; gpu tests skip
# themselves without CUDA). Usage: scripts/test.sh [extra ctest args, e.g. -L unit]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${TUNE_BUILD_DIR:-build}
scripts/install-deps.sh
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j"$(nproc)"
scripts/fetch-assets.sh "$build/assets" >/dev/null
ctest --test-dir "$build" --output-on-failure --timeout 900 -j"${TUNE_TEST_JOBS:-2}" "$@"
