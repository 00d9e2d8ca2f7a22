#!/usr/bin/env bash
# Set up a fresh machine: the Python packages (requirements-dev.txt: runtime + pytest/ruff, at the
# exact versions of requirements-lock.txt) and the Fashion-MNIST files of the demo (Debian package
# dataset-fashion-mnist). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r requirements-dev.txt -c requirements-lock.txt

FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: no apt-get here; get the four Fashion-MNIST IDX files and pass --data-path" >&2
    fi
fi
echo "setup: done ($(python3 -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")'))"
