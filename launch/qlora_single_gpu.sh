#!/usr/bin/env bash
# Q-LoRA on one GPU (or one CPU process): python finetune.py, no torchrun/DeepSpeed.
#   bash launch/qlora_single_gpu.sh -m MODEL -d DATA [-c RECIPE.yaml] [-o OUT] [-- finetune.py flags]
# Run with -h for all options. Hyperparameters: recipes/qlora-default.yaml (or -c).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qlaunch_main qlora single "$@"
