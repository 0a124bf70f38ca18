"""What reaches the console: library lines that ask nothing of the user are demoted to debug level.

Every run used to start with lines a user can do nothing about, before qlaunch's own: torchao's
"Failed to load …so" (transformers imports torchao for its quantizer registry), torch's notes about
enum registration, DeepSpeed's "Setting accelerator to CPU", bitsandbytes' and kernels' notes about an
optional CPU kernel and an offline trust check, and transformers' FutureWarnings about
`is_gradient_checkpointing` / `gradient_checkpointing_enable` (raised by peft, not by qlaunch). Each is
matched by its logger and a fragment of its text (nothing else from those libraries is touched) and
re-logged on qlaunch's logger at DEBUG. Installed when the qlaunch package is imported, before any of
those libraries is: a logger's filters persist from logging.getLogger(name) until the library
configures it.
"""
from __future__ import annotations

import logging
import warnings

NO_ACTION = {  # logger name → fragments of messages that need no action
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
}
NO_ACTION_WARNINGS = (  # transformers 5 renames, called by peft (qlaunch itself uses the new names)
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
)


class _Demote(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(f in message for f in self.fragments):
            logging.getLogger("qlaunch").debug("%s: %s", record.name, message)
            return False
        return True


def quiet_libraries() -> None:
    """Idempotent: install the filters once per logger."""
    for name, fragments in NO_ACTION.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(fragments))
    for category, pattern in NO_ACTION_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
