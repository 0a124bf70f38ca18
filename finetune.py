"""Fine-tune a causal LM with LoRA / Q-LoRA. Run `python finetune.py --help`.

Accepts the flags and data format of Qwen's finetune.py; see README.md.
"""
from qlaunch.cli import main

if __name__ == "__main__":
    main()
