"""Matrices a forward builds cheaply, dequantized again in backward instead of kept until it.

Autograd keeps what each op saves until backward runs; for `F.linear` (and DeepSpeed ZeRO-3's own linear,
which replaces it) that includes the weight. For a packed expert the weight is a 16-bit matrix dequantized
for this one call, so every expert a token reached would stay in 16 bits from forward to backward — for
Qwen3-30B-A3B in bf16 ~1.2 GB per layer, every layer without activation checkpointing. bitsandbytes'
MatMul4Bit avoids the same cost for Linear4bit by dequantizing again in backward; transformers' eager
experts forward calls `F.linear` itself, so here saved-tensor hooks do it: a saved tensor that shares its
storage with a matrix registered by `remember` is kept as how to rebuild it, and rebuilt in backward.

Saved-tensor hooks nest by replacing, not chaining: inside these, activation checkpointing's own hooks
would no longer see anything the experts save and would keep it all. So every other saved tensor is handed
to the hooks that were active on entry. torch has no public getter for them; `_top_saved_tensors_default_hooks`
is what torch's own AOT autograd reads. Without it (another torch), nothing is installed: the weights are then
kept as before, which costs memory, never correctness.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class _Rebuild:
    """How to get a saved view of a registered matrix back: the matrix again, then the same view of it."""
    build: Callable[[], torch.Tensor]
    size: torch.Size
    stride: tuple
    offset: int

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.build().as_strided(self.size, self.stride, self.offset)


def _outer_hooks():
    """The saved-tensor hooks active now as (pack, unpack), (None, None) if none; None if this torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return None if top is None else (top(True) or (None, None))
    except TypeError:  # a private function: another torch may take other arguments
        return None


class RebuildInBackward(torch.autograd.graph.saved_tensors_hooks):
    """Enter around a forward; `remember(matrix, build)` each matrix to rebuild rather than keep."""

    def __init__(self):
        outer = _outer_hooks()
        self.enabled = outer is not None
        self.outer_pack, self.outer_unpack = outer or (None, None)
        self.matrices: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        if self.enabled:
            super().__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            super().__exit__(*exc)
        self.matrices.clear()

    def remember(self, matrix: torch.Tensor, build: Callable[[], torch.Tensor]) -> None:
        if self.enabled and torch.is_grad_enabled():
            self.matrices[matrix.untyped_storage().data_ptr()] = (weakref.ref(matrix), build)

    def _pack(self, tensor: torch.Tensor):
        if self.matrices and type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided:
            ptr = tensor.untyped_storage().data_ptr()
            entry = self.matrices.get(ptr)
            # the weak reference proves the storage still belongs to the registered matrix (a freed one's
            # address can be reused by any later tensor)
            matrix = entry[0]() if entry else None
            if matrix is not None and matrix.untyped_storage().data_ptr() == ptr:
                return _Rebuild(entry[1], tensor.size(), tensor.stride(), tensor.storage_offset())
        return self.outer_pack(tensor) if self.outer_pack else tensor

    def _unpack(self, packed):
        if isinstance(packed, _Rebuild):
            return packed()
        return self.outer_unpack(packed) if self.outer_unpack else packed
