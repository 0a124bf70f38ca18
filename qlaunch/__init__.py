"""qlaunch: LoRA / Q-LoRA fine-tuning launcher."""
from qlaunch.config.console import quiet_libraries

__version__ = "0.1.0"

quiet_libraries()  # before torch, transformers, DeepSpeed, bitsandbytes are imported (qlaunch.config.console)
