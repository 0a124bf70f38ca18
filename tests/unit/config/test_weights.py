"""Weight files read from their safetensors headers, and LoRA module names matched the way peft does."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from qlaunch.config.weights import checkpoint_tensor_names, safetensors_header, unmatched_modules


def test_a_header_is_read_and_damage_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 3), "lm_head.weight": torch.zeros(2, 3)}, str(path))
    header, problem = safetensors_header(str(path))
    assert problem is None and set(header) - {"__metadata__"} == {"model.layers.0.mlp.up_proj.weight", "lm_head.weight"}
    data = path.read_bytes()
    for damaged, words in ((data[:-4], "truncated"), (data + b"\0", "longer than its header describes"),
                           (data[:5], "shorter than a safetensors header"),
                           ((10**9).to_bytes(8, "little") + data[8:], "its header claims"),
                           (len(b"[1]").to_bytes(8, "little") + b"[1]", "not a JSON object"),
                           (len(b"{x").to_bytes(8, "little") + b"{x", "not JSON")):
        path.write_bytes(damaged)
        assert words in safetensors_header(str(path))[1]


def test_the_names_of_a_sharded_checkpoint_come_from_every_shard(tmp_path):
    save_file({"a.q_proj.weight": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"a.k_proj.weight": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.q_proj.weight": "s1.safetensors", "a.k_proj.weight": "s2.safetensors"}}))
    names, problems = checkpoint_tensor_names(str(tmp_path))
    assert problems == [] and names == {"a.q_proj.weight", "a.k_proj.weight"}


def test_modules_match_by_full_name_or_last_parts_as_in_peft():
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.qweight",
             "model.embed_tokens.weight"}
    assert unmatched_modules(["q_proj", "self_attn.q_proj", "model.embed_tokens", "all-linear"], names,
                             tied_lm_head=False) == []
    assert unmatched_modules(["proj", "lm_head", "c_attn"], names, tied_lm_head=False) == ["proj", "lm_head", "c_attn"]
    assert unmatched_modules(["lm_head"], names, tied_lm_head=True) == []  # tied: a module without its own tensor
