#!/usr/bin/env bash
# Download, on the development machine, the wheels that the lent GPU machines lack (they cannot
# fetch anything; their image has Python 3.12, torch, triton, timm, pytest-benchmark, matplotlib,
# but not open_clip_torch or ftfy). They land in .whl/ (git-ignored); carry that folder with the
# run and benchmarks/run_gpu.sh installs them first:
#
#   bash benchmarks/gpu_wheels.sh
#   run: command "SAGE_EXPORT_DIR=$OUT bash benchmarks/run_gpu.sh", carry [".whl"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
ls -l .whl
