#!/usr/bin/env bash
# LoRA on all GPUs of NNODES nodes (CPU processes without a GPU): torchrun + DeepSpeed ZeRO-2 unless --deepspeed CONFIG|none. On every node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash launch/lora_ds.sh ...
#   bash launch/lora_ds.sh -m MODEL -d DATA [-- finetune.py flags]
# Run with -h for all options. Hyperparameters: recipes/lora-default.yaml (or -c).
# The command is built and exec'd by qlaunch/launch.py (also installed as `qlaunch-launch`).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m qlaunch.launch --method lora --mode dist "$@"
