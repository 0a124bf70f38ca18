"""MoE blocks under ZeRO-3: each sparse block is one leaf, gathered whole when it runs.

ZeRO-3 fetches parameters module by module, in the order the first step traced. A sparse block runs only
the experts its tokens are routed to, which differ between ranks and steps, so per-expert fetches stop
matching across ranks (the MoE hangs reported against LLaMA-Factory and ms-swift). DeepSpeed's answer is
to mark the block a leaf: its parameters are fetched together on entry. transformers 5's fused experts
(one 3-D parameter for all experts) already behave so; classes with per-expert modules need it.
"""
from __future__ import annotations

import logging

log = logging.getLogger("qlaunch")


def moe_block_classes(model) -> list[type]:
    """The classes of the model's sparse blocks: modules with an `experts` child (the MoE convention of
    transformers' Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek and others)."""
    classes = []
    for module in model.modules():
        if hasattr(module, "experts") and type(module) not in classes:
            classes.append(type(module))
    return classes


def zero3_leaf_moe_blocks(model) -> list[str]:
    """Mark every sparse block a ZeRO-3 leaf module (deepspeed.utils.set_z3_leaf_modules); their class names."""
    classes = moe_block_classes(model)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    names = [c.__name__ for c in classes]
    log.info("ZeRO-3: MoE blocks (%s) fetched whole as leaf modules, so ranks routing to different experts "
             "fetch the same parameters.", ", ".join(names))
    return names
