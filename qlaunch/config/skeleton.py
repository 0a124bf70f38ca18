"""A model as transformers builds it, with its parameters on the meta device: shapes, names and module types,
no memory, no weights read. Used before loading (counting experts, checking names), by the memory plan, and by
the streaming merge (whose forward passes need real buffers: rotary frequencies are computed at init, not
stored in checkpoints)."""
from __future__ import annotations


def without_quantization(config):
    """The same architecture config without its quantization_config (the skeleton of the full-precision model)."""
    values = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    return config.__class__.from_dict(values)


def meta_skeleton(config, *, trust_remote_code: bool = False, dtype=None, real_buffers: bool = False):
    """The model of a transformers config object (a directory: its config.json), parameters on the meta device.
    real_buffers: buffers are real (small) so that a forward with real weights swapped in can run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, str):
        config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=not real_buffers):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                **({"dtype": dtype} if dtype is not None else {}))
