"""GPUs one can plan for without having them: memory and compute capability.

Memory is the total the driver reports (nvidia-smi's "MiB" column, what
torch.cuda.get_device_properties().total_memory returns, within a few MiB); the CUDA context
and the allocator are counted in the plan, not here. Capability decides precision
(qlaunch.precision: bf16 from 8.0).
"""
from __future__ import annotations

from dataclasses import dataclass

from qlaunch.config.errors import UsageError
from qlaunch.config.machine import Machine, gpu

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    capability: tuple[int, int]


_TABLE = [  # name, total MiB, compute capability
    ("H200", 143771, (9, 0)),
    ("H100-80GB", 81559, (9, 0)),
    ("A100-80GB", 81920, (8, 0)),
    ("A100-40GB", 40960, (8, 0)),
    ("L40S", 46068, (8, 9)),
    ("L40", 46068, (8, 9)),
    ("RTX-A6000", 49140, (8, 6)),
    ("A10G", 23028, (8, 6)),
    ("A10", 23028, (8, 6)),
    ("L4", 23034, (8, 9)),
    ("RTX-4090", 24564, (8, 9)),
    ("RTX-4080", 16376, (8, 9)),
    ("RTX-3090", 24576, (8, 6)),
    ("RTX-3080-10GB", 10240, (8, 6)),
    ("RTX-3060-12GB", 12288, (8, 6)),
    ("T4", 15360, (7, 5)),
    ("V100-32GB", 32768, (7, 0)),
    ("V100-16GB", 16384, (7, 0)),
]
GPUS = {name: GPU(name, mib * MiB, cap) for name, mib, cap in _TABLE}


def _key(name: str) -> str:
    return name.upper().replace("_", "-").replace(" ", "-")


def find_gpu(name: str) -> GPU:
    by_key = {_key(n): g for n, g in GPUS.items()}
    found = by_key.get(_key(name))
    if found is None:
        raise UsageError(f"--gpu {name!r}: unknown GPU; choose one of {', '.join(GPUS)}, "
                         "or pass --gpu_memory_gb N --gpu_capability X.Y.")
    return found


def custom_gpu(memory_gb: float | None, capability: str | None) -> GPU:
    if memory_gb is None or capability is None:
        raise UsageError("--gpu_memory_gb and --gpu_capability go together (e.g. --gpu_memory_gb 24 "
                         "--gpu_capability 8.9), or pass --gpu NAME.")
    try:
        major, minor = (int(x) for x in str(capability).split("."))
    except ValueError:
        raise UsageError(f"--gpu_capability {capability!r}: expected MAJOR.MINOR, e.g. 8.0 or 7.5.") from None
    if memory_gb <= 0:
        raise UsageError(f"--gpu_memory_gb {memory_gb}: must be positive (GiB of GPU memory).")
    return GPU(f"{memory_gb:g} GiB GPU (cc {major}.{minor})", int(memory_gb * GiB), (major, minor))


def machine_for(device: GPU, count: int = 1) -> Machine:
    """The Machine facts precision and placement rules take, for this GPU."""
    return gpu(device.capability, name=device.name, count=count)
