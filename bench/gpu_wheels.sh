#!/usr/bin/env bash
# The wheels the GPU machine lacks and cannot download (it has no network): fire and termcolor
# (fire's one need; its image has torch, numpy and sentencepiece), for its Python (3.12) on
# x86_64 Linux, into .gpu_wheels/ (git-ignored). Run it here, where pip reaches the package index; the folder then travels with
# the tree to the GPU machine (the device tool's carry=[".gpu_wheels"]), and bench/gpu_check.sh
# installs from it with --no-index. PYTHON_VERSION=3.11 bash bench/gpu_wheels.sh for another.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels fire termcolor
ls -l .gpu_wheels
