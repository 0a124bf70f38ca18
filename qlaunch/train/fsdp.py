"""FSDP2 through the Trainer's accelerate integration: the three things it lacks here, nothing more.

- On CPU worlds (use_cpu + gloo, every test of this project) accelerate turns a multi-process run
  into FSDP only for accelerator device types (accelerate/state.py: MULTI_GPU, MULTI_NPU, MULTI_XPU,
  …): a MULTI_CPU world silently drops the FSDP plugin and trains DDP. The mixin puts the plugin back,
  in AcceleratorState and in PartialState's shared state (every later AcceleratorState() copies that
  shared state back, which would revert it before the save). On GPUs accelerate does this itself.
- A 4-bit base loaded on rank 0 only (qlaunch.model.rank0_load): right after accelerate's fully_shard,
  before the first forward and before a checkpoint is resumed, every rank receives its shards.
- The adapter's full tensors for the read-back check: FSDP2 holds each rank's shard as a DTensor.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("qlaunch")


def fsdp_plugin_dropped(distributed_type: str, fsdp_requested: bool) -> bool:
    """Whether accelerate dropped a requested FSDP plugin: only a CPU world (MULTI_CPU) is left out."""
    return bool(fsdp_requested) and distributed_type == "MULTI_CPU"


class Fsdp2Mixin:
    """Trainer mixin: FSDP2 on a CPU world as accelerate sets it up on GPUs, and shards from rank 0."""

    rank0_weights: dict | None = None  # rank 0's full tensors to scatter after fully_shard (build_trainer)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self._scatter_after_prepare()
        state = self.accelerator.state
        kind = getattr(state.distributed_type, "value", str(state.distributed_type))
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        requested = plugin_args is not None and getattr(state, "fsdp_plugin", None) is None
        if not fsdp_plugin_dropped(kind, requested):
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def _scatter_after_prepare(self):
        """accelerator.prepare shards the model and, in the same Trainer step, a resumed checkpoint is loaded
        into the shards: the base's values must arrive in between, so they ride on prepare itself."""
        accelerator, prepare = self.accelerator, self.accelerator.prepare

        def prepare_then_scatter(*args, **kwargs):
            prepared = prepare(*args, **kwargs)
            model = next((x for x in (prepared if isinstance(prepared, (tuple, list)) else (prepared,))
                          if isinstance(x, torch.nn.Module)), None)  # prepare is called for data loaders too
            if model is not None and self.rank0_weights is not None:
                from torch.distributed.fsdp import CPUOffloadPolicy

                from qlaunch.model.rank0_load import scatter_from_rank0

                offload = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
                sent = scatter_from_rank0(model, self.rank0_weights, device=accelerator.device, offload=offload)
                self.rank0_weights = None
                log.info("FSDP2: %d tensors of the base loaded on rank 0 reached their shards on every rank.", sent)
            return prepared

        accelerator.prepare = prepare_then_scatter


def full_adapter_state(model) -> dict:
    """The adapter's tensors, whole: DTensor shards gathered (collective: every rank must call)."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    return {name: (t.full_tensor() if isinstance(t, DTensor) else t)
            for name, t in get_peft_model_state_dict(model).items()}
