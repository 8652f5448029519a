#!/usr/bin/env bash
# Installs the PyTorch baseline (tools/torch/requirements.txt, from PyPI) into a virtual environment
# cached outside the repository, keyed by the requirements' content. Prints the path of its python.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(sha256sum "$here/requirements.txt" | cut -c1-12)
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
venv="$cache/torch-venv-$key"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch, PIL' 2>/dev/null; then
  echo "$venv/bin/python"; exit 0
fi
log="$venv.install.log"
mkdir -p "$cache"
echo "installing PyTorch into $venv (log: $log); the wheels are about 3 GB" >&2
rm -rf "$venv.tmp"
{ python3 -m venv "$venv.tmp" && "$venv.tmp/bin/pip" install -r "$here/requirements.txt"; } >"$log" 2>&1 || {
  echo "ERROR: installing PyTorch from PyPI failed; see $log" >&2; tail -20 "$log" >&2; exit 1
}
rm -rf "$venv"
# A venv records its own path in its scripts; it is only ever run through bin/python, which works moved.
mv "$venv.tmp" "$venv"
echo "$venv/bin/python"
