#!/usr/bin/env bash
# Q-LoRA on all GPUs of NNODES nodes (CPU processes without a GPU): torchrun + DeepSpeed
# (ds_configs/zero2.json unless --deepspeed CONFIG|none). On every node:
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash launch/qlora_ds.sh -m MODEL -d DATA [-- finetune.py flags]
# Run with -h for all options. Hyperparameters: recipes/qlora-default.yaml (or -c).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qlaunch_main qlora dist "$@"
