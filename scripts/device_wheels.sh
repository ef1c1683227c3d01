#!/usr/bin/env bash
# Here, before a device call: the wheels scripts/device_acceptance.sh installs there, where nothing
# can be downloaded. The device image (/work/.library/device/KINDS.md: Python 3.12, x86-64) has
# every package train.bench needs but grain, and grain's array_record and portpicker (their other
# needs, absl-py, cloudpickle, etils, numpy, protobuf and psutil, are there); and flax, in case the
# image's is older than the 0.12.8 this project needs (its needs are there too). The versions are
# the ones the tests run with. .whl/ (5 MB) is kept out of git through .git/info/exclude.
#   bash scripts/device_wheels.sh [DIR]     # default .whl
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
exclude=$(git rev-parse --git-path info/exclude)
if [ "$dest" = .whl ] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then
  echo /.whl/ >>"$exclude"
fi
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest" grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 flax==0.12.8
