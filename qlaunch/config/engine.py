"""Which engine trains the model and what it shards: plain DDP, DeepSpeed ZeRO (--deepspeed CONFIG) or
FSDP2 (--fsdp_config CONFIG), read from their JSON configs once into an `Engine`. The checks of the
configs (warnings about blocks that override flags, combinations that cannot shard) live here too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

@dataclass(frozen=True)
class Engine:
    """What the engine of a run shards, from its config."""

    name: str = "ddp"  # ddp | deepspeed | fsdp2
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # ZeRO-3 keeps a gathered parameter when it is used again within this many elements of the module trace
    reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance (DeepSpeed's default)

    @property
    def shards_parameters(self) -> bool:
        """Every rank holds 1/N of the parameters (ZeRO-3, FSDP2 full shard)."""
        return self.zero_stage == 3 or self.name == "fsdp2"

    @property
    def label(self) -> str:
        if self.name == "deepspeed":
            return f"ZeRO-{self.zero_stage}" + (" + offload" if self.offload_optimizer else "")
        if self.name == "fsdp2":
            return "FSDP2" + (" + CPU offload" if self.offload_params else "")
        return "DDP"


def read_json_config(value) -> dict:
    """A JSON config given as a path, inline JSON text or an already parsed dict; {} when unreadable
    (the file checks report that)."""
    if isinstance(value, str):
        try:
            if value.lstrip().startswith("{"):
                return json.loads(value)
            with open(value) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    return value if isinstance(value, dict) else {}


def engine_of(deepspeed=None, fsdp_config=None) -> Engine:
    if fsdp_config:
        fsdp = read_json_config(fsdp_config)
        offload = str(fsdp.get("cpu_offload", fsdp.get("fsdp_cpu_offload", False))).lower() == "true"
        return Engine("fsdp2", offload_optimizer=offload, offload_params=offload)
    if deepspeed:
        ds = read_json_config(deepspeed)
        zero = ds.get("zero_optimization") or {}
        offload_params = (zero.get("offload_param") or {}).get("device")
        reuse = zero.get("stage3_max_reuse_distance", Engine.reuse_distance)
        return Engine("deepspeed", zero_stage(ds), offloads_optimizer(ds), offload_params in ("cpu", "nvme"),
                      int(reuse) if str(reuse).isdigit() else Engine.reuse_distance)
    return Engine()


def zero_stage(ds: dict) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def deepspeed_config_warnings(ds: dict, optim: str = "adamw_torch") -> list[str]:
    """A DeepSpeed JSON's scheduler/optimizer blocks silently replace the user's flags: say so.

    An optimizer block is needed for optimizer offload (DeepSpeed's CPU Adam runs the step), as in
    ds_configs/zero*_offload.json: with every parameter "auto" (filled from --learning_rate,
    --adam_beta1/2, --adam_epsilon, --weight_decay) and an AdamW --optim, it changes nothing the
    user asked for, so it is not warned about."""
    warnings = []
    if "scheduler" in ds:
        kind = ds["scheduler"].get("type", "?") if isinstance(ds["scheduler"], dict) else "?"
        warnings.append(
            f"the DeepSpeed config has a scheduler block ({kind}): it overrides --lr_scheduler_type and "
            "--warmup_steps. Remove the block (as in ds_configs/) to use your flags."
        )
    if "optimizer" in ds:
        block = ds["optimizer"] if isinstance(ds["optimizer"], dict) else {}
        kind = block.get("type", "?")
        fixed = sorted(k for k, v in (block.get("params") or {}).items() if v != "auto")
        if fixed:
            warnings.append(f"the DeepSpeed config's optimizer block ({kind}) fixes {', '.join(fixed)}: these "
                            "override your flags. Set them to \"auto\" to use --learning_rate, --weight_decay ….")
        if not str(optim).startswith("adamw_torch") or not offloads_optimizer(ds):
            warnings.append(f"the DeepSpeed config has an optimizer block ({kind}): it overrides --optim {optim}"
                            + ("." if offloads_optimizer(ds) else "; remove the block (as in ds_configs/zero2.json)."))
    return warnings


def offloads_optimizer(ds: dict) -> bool:
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")
