#!/usr/bin/env bash
# Q-LoRA on one GPU (or one CPU process): python finetune.py, no torchrun/DeepSpeed.
#   bash launch/qlora_single_gpu.sh -m MODEL -d DATA [-c RECIPE.yaml] [-o OUT] [-- finetune.py flags]
# Run with -h for all options. Hyperparameters: recipes/qlora-default.yaml (or -c).
# The command is built and exec'd by qlaunch/launch.py (also installed as `qlaunch-launch`).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m qlaunch.launch --method qlora --mode single "$@"
