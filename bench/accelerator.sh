#!/usr/bin/env bash
# The GPU check for a single-H200 host, as one prepared call (bench/accelerator.py says what it
# measures). It uses the host's own jax; Python packages that host lacks (gin-config, grain,
# tensorboardX) travel as wheels in .whl/ and are installed into /tmp/site. Under 8 minutes.
#   bench/accelerator.sh          # on the GPU host; the report also goes to $OUT/accelerator.md
#   bench/accelerator.sh --dry    # tiny shapes on CPU (what tests/test_accelerator_script.py runs)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout "${ACCELERATOR_TIMEOUT:-480}" "$python" bench/accelerator.py "$@"
