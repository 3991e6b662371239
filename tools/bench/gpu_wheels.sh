#!/usr/bin/env bash
# Wheels for a bare GPU machine that has PyTorch, transformers, pyarrow, tokenizers, safetensors,
# pyyaml, rich, scipy, numpy and psutil but not DeepSpeed (Python 3.12, x86_64): DeepSpeed (built
# here as a pure-Python wheel, its CUDA ops are JIT-built there when used) and what it and bigtrain
# need beyond that image, and torchao for the fp8 side (an abi3 wheel; its float8 training is
# torch code, its compiled kernels are not used). Then, on the GPU machine, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 python3 tools/bench/bench_gpu.py --seq-len 2048
#
# (.whl is git-ignored; about 10 MB, plus torchao's 3.4 MB.)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
mkdir -p "$out"
version=$(python3 -m pip show deepspeed 2>/dev/null | sed -n 's/^Version: //p')
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$out" "deepspeed==${version:-0.19.8}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
    hjson pydantic pydantic-core annotated-types typing-inspection crc32c "torchao==0.18.0"
ls -la "$out"
