"""Merge a LoRA adapter into its base one tensor at a time, from the base's safetensors files.

Peak memory is one module's weights in float32 plus the adapter, not the model: each tensor of the base is
read (qlaunch.model.shards), dequantized the way training saw it, merged with its module's LoRA update and
written in the output dtype before the next is read.

- The LoRA arithmetic is peft's own: the adapter is attached to the model's skeleton on the meta device and
  each LoRA layer's `merge()` runs on the one module being written (scaling, rsLoRA, DoRA, LoRA bias as peft
  merges them — the same code `merge_and_unload` runs, so the result is bit-identical to it).
- NF4/FP4: the modules transformers quantizes are found by running its bitsandbytes quantizer on the meta
  skeleton; each weight is quantized and dequantized with bitsandbytes exactly as loading does (float32 on
  the CPU, the dtype the in-memory merge loaded).
- GPTQ: the packed tensors are dequantized by the loaded 4-bit model's own layers (gptqmodel's
  `dequantize_weight`), so the model is held at its 4-bit size; `qweight/qzeros/scales/g_idx` become `weight`.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from qlaunch.config.errors import UsageError
from qlaunch.model.inference import dequantized_weight
from qlaunch.model.shards import CheckpointReader, ShardedWriter

GPTQ_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def meta_model(config, trust_remote_code: bool = False):
    """The model's skeleton in float32, without quantization: parameters on the meta device (no memory),
    buffers real (rotary frequencies and the like are computed at init, not stored in checkpoints)."""
    from qlaunch.config.skeleton import meta_skeleton, without_quantization

    return meta_skeleton(without_quantization(config), trust_remote_code=trust_remote_code, dtype=torch.float32,
                         real_buffers=True)


def adapter_on_meta(config, adapter: str, trust_remote_code: bool = False):
    """A PeftModel whose base is a meta skeleton and whose adapter weights are real (float32)."""
    import warnings

    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    with warnings.catch_warnings():  # copying the adapter into meta parameters is a no-op it warns about
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(meta_model(config, trust_remote_code), adapter)
    # The adapter's own parameters (not the base's) become real, then take the file's values.
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters()):
        if param.is_meta and ".base_layer." not in name and ("lora_" in name or "modules_to_save" in name):
            owner, _, leaf = name.rpartition(".")
            modules[owner]._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                                  requires_grad=False)
    result = set_peft_model_state_dict(model, load_peft_weights(adapter, device="cpu"))
    if result.unexpected_keys:
        raise RuntimeError(f"adapter tensors that match no module: {result.unexpected_keys[:3]}")
    return model


def nf4_linears(config, quant: str, double_quant: bool, trust_remote_code: bool = False) -> dict[str, dict]:
    """The modules transformers' bitsandbytes quantizer turns into Linear4bit, with how it quantizes them."""
    from transformers.quantizers import AutoHfQuantizer

    from qlaunch.model.load import quantization_config

    qc = quantization_config(quant, torch.float32,
                             SimpleNamespace(bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=None))
    skeleton = meta_model(config, trust_remote_code)
    AutoHfQuantizer.from_config(qc, pre_quantized=False).preprocess_model(skeleton, device_map={"": "cpu"},
                                                                         dtype=torch.float32)
    return {name: {"blocksize": m.weight.blocksize, "compress_statistics": m.weight.compress_statistics,
                   "quant_type": m.weight.quant_type}
            for name, m in skeleton.named_modules() if type(m).__name__ == "Linear4bit"}


class Dequantizer:
    """The float32 weight of each quantized module, as training computed with it."""

    def __init__(self, quant: str | None, config, reader: CheckpointReader, *, double_quant: bool = True,
                 trust_remote_code: bool = False):
        self.quant = quant
        self.gptq = None  # the loaded 4-bit model whose layers dequantize GPTQ weights (attach_gptq)
        if quant in ("nf4", "fp4"):
            self.nf4 = nf4_linears(config, quant, double_quant, trust_remote_code)
            self.modules = set(self.nf4)
        elif quant == "gptq":
            self.modules = {n.removesuffix(".qweight") for n in reader.location if n.endswith(".qweight")}
        else:
            self.modules = set()

    def weight(self, module: str, reader: CheckpointReader, device: torch.device) -> torch.Tensor:
        if self.quant == "gptq":
            layer = self.gptq.get_submodule(module)  # peft-wrapped: the quantized layer is its base layer
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            return dequantized_weight(layer).to(device)
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(reader.read(module + ".weight").to(device).float(),
                                        quant_storage=torch.uint8, **self.nf4[module])
        return F.dequantize_4bit(packed, state).float()


class StreamingMerge:
    """What each output tensor is (its name, dtype, shape) and its merged float32 value, module by module."""

    def __init__(self, base: str, adapter: str, quant: str | None, dtype: torch.dtype, *, config,
                 double_quant=True, trust_remote_code: bool = False, device: str = "cpu"):
        """Reads headers, the config and the adapter only (meta skeleton): cheap, and refuses what it cannot
        merge (UsageError) before any weights load. A GPTQ base needs attach_gptq before writing."""
        try:
            self.reader = CheckpointReader(base)
        except ValueError as e:
            raise UsageError(f"base {base!r}: {e}; the merge reads safetensors files (save the base with "
                             "save_pretrained(..., safe_serialization=True) or download its .safetensors).") from None
        self.peft = adapter_on_meta(config, adapter, trust_remote_code)
        self.device = torch.device(device)
        for param in self.peft.parameters():  # the adapter's (the base's are meta and stay so)
            if not param.is_meta:
                param.data = param.data.to(self.device)
        for module in self.peft.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    module._buffers[name] = buffer.to(self.device)
        self.model = self.peft.get_base_model()
        self.dequantizer = Dequantizer(quant, config, self.reader, double_quant=double_quant,
                                       trust_remote_code=trust_remote_code)
        self.dtype = dtype
        self.tensors = self._plan()
        self._problems()

    def attach_gptq(self, model) -> None:
        """The loaded GPTQ model (plain or peft-wrapped base) whose layers dequantize the packed weights."""
        self.dequantizer.gptq = model

    def _plan(self) -> list[tuple[str, torch.dtype, list[int]]]:
        """Output tensors in the base's order: a GPTQ module's packed tensors become one `weight`."""
        plan = []
        for name in self.reader.names():
            module, _, leaf = name.rpartition(".")
            if module in self.dequantizer.modules and self.dequantizer.quant == "gptq":
                if leaf == "qweight":
                    layer = self.model.get_submodule(module)
                    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                    plan.append((module + ".weight", self.dtype, list(base.weight.shape)))
                if leaf in GPTQ_PACKED:
                    continue
            source = self.reader.dtype(name)
            plan.append((name, self.dtype if source.is_floating_point else source, self.reader.shape(name)))
        return plan

    def _problems(self) -> None:
        """The streaming merge writes the checkpoint's tensors under their own names: they must be the
        model's names (transformers renames some at load, e.g. fused MoE experts), and LoRA must sit on
        linear layers (the proof computes them as such)."""
        from peft.tuners.lora import LoraLayer

        state = set(self.model.state_dict())
        unknown = [n for n, _, _ in self.tensors if n not in state and n.replace(".weight", ".base_layer.weight")
                   not in state and not self._saved_copy(n)]
        if unknown:
            raise UsageError(f"the base's tensor {unknown[0]!r} (and {len(unknown) - 1} more) is not a tensor of "
                             "the model transformers builds (it renames or fuses them at load); merging this "
                             "checkpoint is not supported yet.")
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and not isinstance(module.get_base_layer(), torch.nn.Linear):
                raise UsageError(f"LoRA on {name} ({type(module.get_base_layer()).__name__}): the merge handles "
                                 "LoRA on linear layers only; train without it in --lora_target_modules.")

    def _saved_copy(self, name: str):
        """The trained copy of a --lora_modules_to_save module holding `name`, or None."""
        module, _, leaf = name.rpartition(".")
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            try:
                owner = self.model.get_submodule(".".join(parts[:i]))
            except AttributeError:
                continue
            copies = getattr(owner, "modules_to_save", None)
            if copies is not None and "default" in copies:
                inner = ".".join(parts[i:] + [leaf])
                return copies["default"].get_parameter(inner).detach().float()
        return None

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The merged float32 tensors of one LoRA or quantized module ({"weight": ..., "bias": ...})."""
        from peft.tuners.lora import LoraLayer

        layer = self.model.get_submodule(module)
        weight = (self.dequantizer.weight(module, self.reader, self.device) if module in self.dequantizer.modules
                  else self.reader.read(module + ".weight").to(self.device).float())
        bias_name = module + ".bias"
        bias = self.reader.read(bias_name).to(self.device).float() if bias_name in self.reader.location else None
        if not isinstance(layer, LoraLayer):
            return {"weight": weight} | ({"bias": bias} if bias is not None else {})
        base = layer.get_base_layer()
        metas = dict(base._parameters)
        base._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            base._parameters["bias"] = torch.nn.Parameter(bias, requires_grad=False)
        try:
            with torch.no_grad():
                layer.merge()
            merged = {"weight": base.weight.detach()} | ({"bias": base.bias.detach()} if bias is not None else {})
        finally:
            layer.merged_adapters.clear()
            base._parameters.update(metas)
        return merged

    def merged_modules(self) -> set[str]:
        """Modules whose output tensors are computed (LoRA or quantized), not copied."""
        from peft.tuners.lora import LoraLayer

        lora = {n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        return lora | self.dequantizer.modules

    def copied(self, name: str) -> torch.Tensor:
        """A tensor the merge copies: a --lora_modules_to_save module's trained copy, else the base's."""
        value = self._saved_copy(name)
        return self.reader.read(name) if value is None else value

    def write(self, out_dir: str, max_shard_bytes: int) -> list[str]:
        """Every output tensor in the output dtype, one module at a time; returns the files written."""
        computed = self.merged_modules()
        writer = ShardedWriter(out_dir, self.tensors, max_shard_bytes)
        pending: dict[str, torch.Tensor] = {}
        for name, dtype, _ in self.tensors:
            module, _, leaf = name.rpartition(".")
            if module in computed and leaf in ("weight", "bias"):
                if name not in pending:
                    pending.update({f"{module}.{k}": v for k, v in self.module_tensors(module).items()})
                value = pending.pop(name)
            else:
                value = self.copied(name)
            writer.write(name, value.to(dtype))
            del value
            release_freed_memory()
        return writer.close()

    def mismatched_copies(self, saved: CheckpointReader) -> list[str]:
        """The saved tensors that are not their copied source in the output dtype (read one at a time)."""
        computed = self.merged_modules()
        return [name for name, dtype, _ in self.tensors
                if name.rpartition(".")[0] not in computed
                and not torch.equal(saved.read(name), self.copied(name).to(dtype).cpu())]


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim). Each module's float32 temporaries are
    freed before the next module, but glibc keeps freed chunks in its heap, so without this the process
    grows by fragments module after module (measured: +20-30 MB over 24 layers) instead of staying at one
    module's working set. A no-op where glibc is absent."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018  (present in glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def merge_device(machine, quant: str | None) -> tuple[str, str]:
    """(where the merge computes, why), from the device facts (pure: tested with GPU facts).

    On a GPU the dequantization, the LoRA update and the proof's forwards run there, and NF4 is quantized by
    the CUDA kernel, as training on that GPU quantized it. A GPTQ base stays on the CPU: on CUDA it loads
    for inference with gptqmodel's repacking kernels (Marlin/ExLlama), which do not dequantize back."""
    if not machine.cuda:
        return "cpu", "no GPU"
    if quant == "gptq":
        return "cpu", "GPTQ's CUDA inference kernels repack their weights and cannot dequantize them"
    return "cuda", f"GPU: {machine.name or 'CUDA device 0'}"


def output_dtype(requested: str, base: str) -> torch.dtype:
    """--dtype auto: the base's compute dtype as its config records it (bf16/fp16), float32 if none."""
    if requested != "auto":
        return getattr(torch, requested)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    recorded = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, recorded) if recorded in ("bfloat16", "float16", "float32") else torch.float32
