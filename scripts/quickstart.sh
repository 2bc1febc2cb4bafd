#!/usr/bin/env bash
# The README's first command: installs Debian dependencies, builds, generates a tiny
# Llama model and dataset, starts tune-server with a local worker, submits the demo
# job with tunectl and streams its loss until it SUCCEEDS (uses a GPU when present).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh
exec scripts/demo.sh "$@"
