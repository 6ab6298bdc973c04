#!/usr/bin/env bash
# `make bench-gpu`: the GPU check in one command, on a machine that reaches no package registry.
#
#   make gpu-wheels      # here, with network: the wheels the GPU image lacks, into .whl/ (about 60 MB)
#   make bench-gpu       # there: installs them from .whl/ (no index), then runs the benchmark (under 8 minutes)
#
# Qwen2.5-VL-7B from its published config with random weights; plain TRL against the package (length grouping, fast
# collator, LM head at labelled positions; flash-attention and padding-free when flash-attn is installed), bf16 LoRA
# and QLoRA; tokens/s, peak memory, MFU. Writes benchmarks/results/gpu.md and gpu.json. Arguments are passed on to
# benchmarks/speed.py (for example --model_size 3B, or --time_budget_minutes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
REQUIREMENTS=benchmarks/gpu_requirements.txt

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "Installing from $WHEELS (no index): $(grep -v '^#' "$REQUIREMENTS" | tr '\n' ' ')"
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
            -r "$REQUIREMENTS"; then
        # A dependency the image holds at another version than these wheels ask for: install the carried wheels as
        # they are and let the imports below say whether the result works.
        echo "pip could not resolve every dependency from $WHEELS and the image; installing the wheels without it"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps \
            -r "$REQUIREMENTS"
    fi
else
    echo "No wheels in $WHEELS (run 'make gpu-wheels' where a registry is reachable); using what is installed."
fi
"$PYTHON" -c "import torch, trl, transformers, peft, datasets; print('torch', torch.__version__, '| trl', trl.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__, '| CUDA', torch.cuda.is_available())"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/speed.py --gpu --model_size 7B --name gpu "$@"
