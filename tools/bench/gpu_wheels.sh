#!/usr/bin/env bash
# Wheels for the bare GPU machine (Python 3.12, x86_64; it has PyTorch, transformers, pyarrow,
# tokenizers, safetensors, pyyaml, rich, scipy, numpy, psutil and typing-extensions, but not
# DeepSpeed, pydantic, hjson, crc32c or torchao): DeepSpeed built here as a pure-Python wheel (its
# CUDA ops are JIT-built there when used), pydantic with the pydantic-core it was released with,
# what they need beyond the image, a typing-extensions recent enough for pydantic, and torchao
# for the fp8 side. Starts from an empty .whl/ (git-ignored, ~15 MB), then prints the device
# command, which runs tools/bench/device_check.sh with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
rm -rf "$out"
mkdir -p "$out"
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
pydantic=$(version pydantic)
pydantic=${pydantic:-2.11.7}
core=$(python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/pydantic-probe "pydantic==$pydantic" >/dev/null \
       && unzip -p /tmp/pydantic-probe/pydantic-"$pydantic"-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
rm -rf /tmp/pydantic-probe
deepspeed=$(version deepspeed)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$out" "deepspeed==${deepspeed:-0.19.8}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
    hjson "pydantic==$pydantic" "pydantic-core==$core" annotated-types typing-inspection "typing-extensions>=4.14" \
    crc32c "torchao==0.18.0"
ls -la "$out"
echo "pydantic $pydantic with pydantic-core $core"
echo "device command: run(command=\"bash tools/bench/device_check.sh\", carry=[\".whl\"], timeout_s=560)"
echo "(locally, without a GPU: python3 tools/bench/device_check.py --dry-run)"
