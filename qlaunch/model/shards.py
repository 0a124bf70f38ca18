"""Read and write safetensors one tensor at a time.

A merge of a 70B model must not hold the model: it reads one tensor, computes its merged value and writes
it. safetensors' own API does neither half: `safe_open` maps the whole file (its pages count as resident as
they are touched) and `save_file` needs every tensor of a file in one dict. The format is simple — 8 bytes
of header length, a JSON header naming each tensor's dtype, shape and byte range, then the bytes — so a file
whose tensors are known in advance (names, dtypes, shapes) can be written header first, tensor by tensor.
Files written here load with safetensors and transformers (tested).
"""
from __future__ import annotations

import json
import math
import os

import torch

from qlaunch.config.weights import INDEX, safetensors_header, weight_files

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointReader:
    """The tensors of a checkpoint directory (one file or an index of shards), read one at a time with plain
    file reads: nothing stays mapped, so memory is the tensor being read."""

    def __init__(self, model_dir: str):
        files, problems = weight_files(model_dir)
        if problems or not files:
            raise ValueError(problems[0] if problems else f"no safetensors files in {model_dir!r}")
        self.files = files
        self.location: dict[str, tuple[str, dict, int]] = {}  # name -> (file, entry, data start)
        for path in files:
            header, problem = safetensors_header(path)
            if problem:
                raise ValueError(f"{os.path.basename(path)}: {problem}")
            start = 8 + int.from_bytes(open(path, "rb").read(8), "little")
            for name, entry in header.items():
                if name != "__metadata__":
                    self.location[name] = (path, entry, start)

    def names(self) -> list[str]:
        """Tensor names, file by file in the order each file stores them."""
        return sorted(self.location, key=lambda n: (self.files.index(self.location[n][0]),
                                                    self.location[n][1]["data_offsets"][0]))

    def shape(self, name: str) -> list[int]:
        return list(self.location[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.location[name][1]["dtype"]]

    def file_bytes(self) -> int:
        return max(os.path.getsize(path) for path in self.files)

    def read(self, name: str) -> torch.Tensor:
        path, entry, start = self.location[name]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)  # read into it: no second copy of the bytes
        with open(path, "rb") as f:
            f.seek(start + begin)
            f.readinto(data)
        dtype = DTYPES[entry["dtype"]]
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def shard_plan(tensors: list[tuple[str, torch.dtype, list[int]]], max_bytes: int) -> list[list[str]]:
    """Tensors (in writing order) grouped into files of at most max_bytes (a larger tensor gets a file)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors, in plan order, into model.safetensors or model-0000i-of-0000N.safetensors plus
    the index transformers reads. Each file's header is written when the file is opened."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, torch.dtype, list[int]]], max_bytes: int):
        self.out_dir = out_dir
        self.spec = {name: (dtype, list(shape)) for name, dtype, shape in tensors}
        self.shards = shard_plan(tensors, max_bytes)
        n = len(self.shards)
        self.file_names = (["model.safetensors"] if n == 1 else
                           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.order = [(i, name) for i, shard in enumerate(self.shards) for name in shard]
        self.position = 0
        self.handle = None
        self.current = -1

    def _open(self, index: int) -> None:
        if self.handle:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.shards[index]:
            dtype, shape = self.spec[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(os.path.join(self.out_dir, self.file_names[index]), "wb")
        self.handle.write(len(raw).to_bytes(8, "little") + raw)
        self.current = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, expected = self.order[self.position]
        dtype, shape = self.spec[name]
        if name != expected or tensor.dtype != dtype or list(tensor.shape) != shape:
            raise RuntimeError(f"writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype} "
                               f"{list(tensor.shape)}")
        if index != self.current:
            self._open(index)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self.handle.write(data.reshape(-1).view(torch.uint8).numpy())  # a view of the tensor's bytes, no copy
        self.position += 1

    def close(self) -> list[str]:
        """Finish the files (every planned tensor must have been written) and write the index."""
        if self.handle:
            self.handle.close()
        if self.position != len(self.order):
            raise RuntimeError(f"writer got {self.position} of {len(self.order)} tensors")
        if len(self.file_names) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.spec.values())
            weight_map = {name: self.file_names[i] for i, name in self.order}
            with open(os.path.join(self.out_dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        return self.file_names
