"""The streaming merge: files written one tensor at a time, equal bit for bit to the in-memory merge."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlaunch.cli import fit, prepare
from qlaunch.model.shards import CheckpointReader, ShardedWriter, shard_plan


def test_written_files_load_with_safetensors_and_read_back_tensor_by_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16), "a.bias": torch.randn(7, generator=g),
               "b.flag": torch.tensor([True, False, True]), "b.count": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c.empty": torch.empty(0, 4, dtype=torch.float16), "d.half": torch.randn(3, 3, generator=g).half()}
    plan = [(n, t.dtype, list(t.shape)) for n, t in tensors.items()]
    assert shard_plan(plan, 80) == [["a.weight"], ["a.bias", "b.flag", "b.count", "c.empty"], ["d.half"]]
    writer = ShardedWriter(str(tmp_path), plan, max_bytes=80)
    with pytest.raises(RuntimeError, match="expected a.weight"):
        writer.write("a.bias", tensors["a.bias"])  # out of plan order
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["b.count"] == files[1]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:  # safetensors' own reader agrees byte for byte
        loaded.update(load_file(str(tmp_path / f)))
    reader = CheckpointReader(str(tmp_path))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
        assert torch.equal(reader.read(name), tensor) and reader.shape(name) == list(tensor.shape)
    with pytest.raises(RuntimeError, match="got 1 of 2"):
        short = ShardedWriter(str(tmp_path / "x"), plan[:2], max_bytes=10**6)
        os.makedirs(tmp_path / "x")
        short.write("a.weight", tensors["a.weight"])
        short.close()


def reshard(src: str, dst: str, parts: int) -> None:
    """The checkpoint in `parts` files with an index, written by safetensors itself (not by qlaunch)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = list(tensors)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def in_memory_merge(adapter: str, base: str, quant: str | None) -> dict[str, torch.Tensor]:
    """The reference: the whole base dequantized in float32 (merge.plain_copy), peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlaunch.merge import plain_copy
    from qlaunch.model.inference import load_for_inference

    if quant == "gptq":
        from qlaunch.model.gptq import gptq_training_config

        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=gptq_training_config(),
                                                     device_map={"": "cpu"}, dtype=torch.float32)
    else:
        model, _ = load_for_inference(base, None, quantization=quant or "none", device="cpu")
    plain = plain_copy(model, torch.float32) if quant else model.float()
    return PeftModel.from_pretrained(plain, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("kind", ["lora", "nf4", "gptq"])
def test_streamed_merge_of_a_sharded_base_equals_the_in_memory_merge_bit_for_bit(kind, demo, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlaunch.merge import merge
    from qlaunch.model.merge_proof import batch_logits, probe_batch

    source = demo["model"]
    if kind == "gptq":
        source = pytest.importorskip("qlaunch.model.gptq_pack").make_gptq_checkpoint(demo["model"],
                                                                                      str(tmp_path / "gptq"))
    base = str(tmp_path / "base")
    reshard(source, base, 4)
    adapter = str(tmp_path / "adapter")
    fit(prepare(["--model_name_or_path", base, "--data_path", demo["train"], "--output_dir", adapter,
                 "--use_lora" if kind == "lora" else "--q_lora", "--max_steps", "3", "--learning_rate", "5e-3",
                 "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
                 "--model_max_length", "64", "--lora_dropout", "0", "--disable_tqdm", "True"]))
    out = tmp_path / "merged"
    info = merge(adapter, str(out), dtype="float32", max_shard_gb=0.25 / 2**10)  # 256 KB files
    assert len(info["files"]) >= 3 and info["report"]["exact"]["passed"], info["report"]
    streamed = {}
    for f in info["files"]:
        streamed.update(load_file(str(out / f)))
    reference = in_memory_merge(adapter, base, None if kind == "lora" else kind)
    assert set(streamed) <= set(reference) and set(reference) - set(streamed) <= {"lm_head.weight"}
    unequal = [n for n in streamed if not torch.equal(streamed[n], reference[n])]
    assert unequal == [], unequal[:5]
    # plain transformers loads it; its logits are the saved pass's (what the report compared)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    from qlaunch.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    batch = probe_batch(tokenizer, [[{"role": "user", "content": "List three prime numbers."}]])
    plain = batch_logits(model, batch, "cpu")[0]
    exact_bound = info["report"]["exact"]["bound"]
    reloaded = info["report"]["saved_vs_exact_max_abs_logit_diff"]
    assert reloaded <= exact_bound and plain.isfinite().all()


def test_the_default_dtype_is_the_bases_own_and_the_config_says_it(demo, tmp_path):
    from qlaunch.model.merge_stream import output_dtype

    config = json.loads(open(os.path.join(demo["model"], "config.json")).read())
    for recorded, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), (None, torch.float32)):
        d = tmp_path / str(recorded)
        d.mkdir()
        values = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
        (d / "config.json").write_text(json.dumps(values | ({"dtype": recorded} if recorded else {})))
        assert output_dtype("auto", str(d)) == expected
        assert output_dtype("float32", str(d)) == torch.float32


def test_what_cannot_be_streamed_is_refused_with_exit_2_before_any_weights_load(demo, tmp_path, monkeypatch, capsys):
    """LoRA on an embedding and a base without safetensors files: one line naming the fix, exit 2, no
    from_pretrained of the base, no output directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from qlaunch import merge as merge_cmd

    embedding = tmp_path / "embedding"
    model = AutoModelForCausalLM.from_pretrained(demo["model"])
    get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])).save_pretrained(embedding)
    binary_base = tmp_path / "bin_base"
    shutil.copytree(demo["model"], binary_base, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), binary_base / "pytorch_model.bin")
    plain = tmp_path / "plain"
    model = AutoModelForCausalLM.from_pretrained(demo["model"])
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(plain)

    capsys.readouterr()  # the setup's own loading lines
    loads = []
    real = PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    for argv, says in ((["--adapter", str(embedding)], "LoRA on model.embed_tokens (Embedding)"),
                       (["--adapter", str(plain), "--base", str(binary_base)], "the merge reads safetensors")):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            merge_cmd.main([*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and says in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists() and loads == []


def test_the_merge_computes_on_a_gpu_except_for_gptq_bases():
    from qlaunch.config.machine import CPU, gpu
    from qlaunch.model.merge_stream import merge_device

    h100 = gpu((9, 0), "NVIDIA H100")
    assert merge_device(h100, "nf4") == ("cuda", "GPU: NVIDIA H100")
    assert merge_device(h100, None)[0] == "cuda" and merge_device(gpu((7, 5)), "fp4")[0] == "cuda"
    device, why = merge_device(h100, "gptq")
    assert device == "cpu" and "cannot dequantize" in why
    assert merge_device(CPU, "nf4") == ("cpu", "no GPU") and merge_device(CPU, "gptq")[0] == "cpu"
