#!/usr/bin/env bash
# transformers 5.x into a folder of its own (default .cache/transformers5), beside the environment's
# 4.x, for the test that checks Hugging Face conversion against both (tests/single_process/
# test_convert.py). --no-deps keeps the environment's torch, numpy and safetensors: only what 5.x
# needs beyond them goes in, plus its smaller requirements where the environment lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-.cache/transformers5}"
missing=()
for module in anyio idna h11 click typing_extensions; do
    python -c "import $module" 2>/dev/null || missing+=("$module")
done
python -m pip install --quiet --no-deps --upgrade --target "$target" 'transformers>=5,<6' \
    'huggingface_hub>=2.4,<3' 'tokenizers>=0.23.1,<0.24' 'httpx2>=2,<3' 'httpcore2>=2,<3' 'truststore>=0.10' "${missing[@]}"
PYTHONPATH="$target" python -c "import transformers; from transformers import Qwen3MoeForCausalLM; print('transformers', transformers.__version__, 'in', '$target')"
