#!/usr/bin/env bash
# Downloads, here, the wheels bench/accelerator.sh installs on the GPU host (Python 3.12,
# x86-64), whose image has jax, flax, optax, orbax, etils, tensorstore and tqdm but not these.
# .whl/ is git-ignored; name it in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  gin-config==0.5.0 grain==0.2.18 array-record==0.8.6 portpicker tensorboardX==2.6.5
ls -l .whl
