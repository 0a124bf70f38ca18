"""The model: load the tokenizer and the base (full precision, NF4, GPTQ), attach LoRA, load for inference.

Owns loading (load), LoRA (lora), gptqmodel's trainable kernels (gptq), the GPTQ v1 packed format
(gptq_pack), the bytes a 4-bit layer stores (footprint), loading an adapter the way it was trained
plus generation (inference) and the per-layer quantization error report (quant_error).
May import qlaunch.config and qlaunch.data.
"""
