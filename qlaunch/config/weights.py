"""What a checkpoint's weight files declare, read from their headers before anything loads.

A safetensors file is 8 bytes of header length, a JSON header naming every tensor with its dtype, shape
and byte range, then the data. Reading the headers (kilobytes, even for a 70B checkpoint) shows a
truncated download or a missing shard, and gives the tensor names — so LoRA targets and
`--lora_modules_to_save` can be checked against the modules they name before minutes of loading end in
a traceback.
"""
from __future__ import annotations

import json
import os

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header size


def safetensors_header(path: str) -> tuple[dict | None, str | None]:
    """(the header, None) or (None, why it cannot be one): too short, a header larger than the file, not a JSON
    object, or a data size that differs from the header's (a truncated download)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None, f"{size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER):
            return None, f"its header claims {length} bytes, more than the file holds ({size})"
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError:
        return None, "its header is not JSON"
    if not isinstance(header, dict):
        return None, "its header is not a JSON object"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return None, "its header has a tensor without data offsets"
    if 8 + length + end != size:
        state = "truncated" if size < 8 + length + end else "longer than its header describes"
        return None, f"{state}: {size} bytes, the header describes {8 + length + end}"
    return header, None


def weight_files(model_dir: str) -> tuple[list[str], list[str]]:
    """(the safetensors files the checkpoint consists of, problems): the index's shards, all present, or the
    directory's *.safetensors files."""
    index = os.path.join(model_dir, INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return [], [f"{INDEX} is unreadable ({type(e).__name__}); download it again."]
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            return [], [f"{len(missing)} weight file(s) named by {INDEX} are missing ({', '.join(missing[:3])}); "
                        "download the whole checkpoint."]
        return [os.path.join(model_dir, s) for s in shards], []
    return sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors")), []


def checkpoint_tensor_names(model_dir: str) -> tuple[set[str] | None, list[str]]:
    """(every tensor name in the checkpoint's safetensors files — None when it has none, e.g. .bin only —,
    problems with those files)."""
    files, problems = weight_files(model_dir)
    if problems or not files:
        return None, problems
    names: set[str] = set()
    for path in files:
        header, problem = safetensors_header(path)
        if problem:
            problems.append(f"{os.path.basename(path)}: {problem}; download it again.")
        else:
            names.update(k for k in header if k != "__metadata__")
    return (names if not problems else None), problems


def unmatched_modules(wanted: list[str] | None, tensor_names: set[str], *, tied_lm_head: bool) -> list[str]:
    """The entries of `wanted` (peft's matching: a module's full name, or its last dotted parts) that name no
    module holding a tensor in the checkpoint. A tied lm_head has no tensor of its own but is a module."""
    if not wanted:
        return []
    modules = {name.rsplit(".", 1)[0] for name in tensor_names if "." in name}
    if tied_lm_head:
        modules.add("lm_head")
    return [w for w in wanted if w != "all-linear" and not any(m == w or m.endswith("." + w) for m in modules)]
