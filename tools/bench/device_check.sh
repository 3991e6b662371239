#!/usr/bin/env bash
# The GPU check of one lent slot (tools/bench/device_check.py), on the GPU machine from the
# repository root: installs the wheels tools/bench/gpu_wheels.sh put in .whl/ (carried along),
# then runs every side within its budget. Arguments go to device_check.py (--budget, --only, --out).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD DS_BUILD_OPS=0 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_check.sh: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
exec python3 tools/bench/device_check.py "$@"
