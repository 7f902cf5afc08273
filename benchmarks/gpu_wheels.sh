#!/usr/bin/env bash
# Download the wheels an offline GPU machine needs for benchmarks/run_gpu.sh, on a machine with internet
# access. They land in .whl/ (git-ignored); copy that folder with the repository to the GPU machine, where
# run_gpu.sh installs them (pip install --no-index --no-deps --target /tmp/site .whl/*.whl) before
# anything else. To install them yourself instead: pip install --no-index --no-deps .whl/*.whl
#
#   bash benchmarks/gpu_wheels.sh                  # for a GPU machine with CPython 3.12 on x86-64 Linux
#   SAGE_WHEEL_PYTHON=3.11 bash benchmarks/gpu_wheels.sh   # another Python on the GPU machine
#
# The GPU machine is assumed to have torch (>= 2.10, as xformers 0.0.35 requires; tested against torch 2.11,
# Triton 3.6), triton, torchvision, numpy, pillow, pyyaml, pytest, pytest-benchmark and matplotlib, and to
# lack open_clip_torch (and its ftfy, wcwidth) and xformers: those are the wheels downloaded here, without
# their dependencies. xformers is optional: it is timed against SDPA and open_clip's attention in the
# encoder stage; without it, or where the model's probe finds it does not run (the 0.0.35 wheel was built
# for torch 2.10 / CUDA 12.8 and links libcudart.so.12), its case skips with the reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version "${SAGE_WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4" "xformers==0.0.35"
ls -l .whl
