"""The device facts every machine-dependent decision takes as an argument.

Decisions (precision, placement, DDP options) never query torch.cuda themselves: they take a
`Machine`, so tests can pass the facts of a GPU the test machine does not have.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    cuda: bool
    capability: tuple[int, int] | None = None  # compute capability of the first visible GPU
    device_count: int = 0
    name: str | None = None

    @property
    def bf16(self) -> bool:
        # Decided by capability, not torch.cuda.is_bf16_supported(): that one counts emulation
        # and says True on V100/T4, where bf16 runs several times slower than fp16.
        return bool(self.cuda and self.capability and self.capability >= (8, 0))

    @property
    def tf32(self) -> bool:
        return self.bf16  # TF32 tensor cores arrived with Ampere, like bf16

    @classmethod
    def detect(cls) -> "Machine":
        import torch

        if not torch.cuda.is_available():
            return CPU
        return cls(cuda=True, capability=tuple(torch.cuda.get_device_capability(0)),
                   device_count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0))


CPU = Machine(cuda=False)


def gpu(capability: tuple[int, int], name: str | None = None, count: int = 1) -> Machine:
    """A GPU machine's facts, for planning and tests."""
    return Machine(cuda=True, capability=tuple(capability), device_count=count, name=name)
