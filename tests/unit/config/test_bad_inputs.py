"""A corpus of bad inputs: each gets exit code 2, one message naming the problem and the fix,
no traceback, and nothing created in --output_dir — before the model is loaded.

Each case is (name, function(tmp_path, demo) → extra argv, expected substring). The base command
is a valid LoRA run on the demo model; the case adds or replaces what makes it bad.
"""
import json
import os
import shutil

import pytest

from qlaunch.cli import main


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def data(tmp_path, records):
    return ["--data_path", write(tmp_path, "data.json", json.dumps(records))]


def model_copy(tmp_path, demo, drop):
    target = tmp_path / "model_copy"
    shutil.copytree(demo["model"], target)
    for name in os.listdir(target):
        if name.endswith(drop):
            os.remove(target / name)
    return ["--model_name_or_path", str(target)]


def output_into_model(tmp_path, demo, where):
    """--output_dir that is (or sits inside, or links to) a copy of the base model's directory."""
    model = model_copy(tmp_path, demo, ".none")
    out = {"same": model[1], "inside": os.path.join(model[1], "adapter"), "link": str(tmp_path / "link")}[where]
    if where == "link":
        os.symlink(model[1], out)
    return [*model, "--output_dir", out]


def output_around_data(tmp_path, demo):
    """--output_dir that contains the training data."""
    os.makedirs(tmp_path / "around")
    data = shutil.copy(demo["train"], tmp_path / "around" / "train.json")
    return ["--data_path", str(data), "--output_dir", str(tmp_path / "around")]


def fifo_data(tmp_path, demo):
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    return ["--data_path", str(path)]


def remote_code_model(tmp_path, demo):
    """The demo model whose config points at modelling code of its own (as Qwen-7B's does)."""
    model = model_copy(tmp_path, demo, ".none")
    config_path = os.path.join(model[1], "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    with open(config_path, "w") as f:
        json.dump(config, f)
    return [*model, "--trust_remote_code", "True", "--packing", "True"]


def damaged_weights(tmp_path, demo, how):
    """A copy of the demo model whose weights are truncated, padded, garbage, or sharded with a shard gone."""
    model = model_copy(tmp_path, demo, ".none")
    weights = os.path.join(model[1], "model.safetensors")
    if how == "truncated":
        os.truncate(weights, os.path.getsize(weights) - 100)
    elif how == "padded":
        with open(weights, "ab") as f:
            f.write(b"\0" * 8)
    elif how == "garbage":
        with open(weights, "wb") as f:
            f.write(b"<html>404</html>")  # what a failed download leaves
    elif how == "missing shard":
        with open(os.path.join(model[1], "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                      "model.norm.weight": "model.safetensors"}}, f)
    return model


def edited_config(tmp_path, demo, **changes):
    """A copy of the demo model whose config.json has these keys changed (None: removed)."""
    model = model_copy(tmp_path, demo, ".none")
    path = os.path.join(model[1], "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return model


def checkpoint(tmp_path, demo, files: dict[str, str]):
    """--resume_from_checkpoint of a directory holding these files (name → text)."""
    path = tmp_path / "checkpoint-2"
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return ["--resume_from_checkpoint", str(path)]


def flags(*argv):
    return lambda tmp_path, demo: list(argv)


CASES = [
    # ---- numbers and choices the Trainer (and torch) would only reject after loading the model
    ("negative lr", flags("--learning_rate", "-1"), "--learning_rate -1.0: must not be negative"),
    ("batch 0", flags("--per_device_train_batch_size", "0"), "--per_device_train_batch_size 0: must be at least 1"),
    ("eval batch 0", flags("--per_device_eval_batch_size", "0"), "--per_device_eval_batch_size 0: must be at least 1"),
    ("accumulation 0", flags("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps 0: must be at"),
    ("max_steps 0", flags("--max_steps", "0"), "--max_steps 0: pass a positive number of steps, or -1"),
    ("max_steps -5", flags("--max_steps", "-5"), "--max_steps -5: pass a positive number"),
    ("epochs 0", flags("--num_train_epochs", "0"), "--num_train_epochs 0.0: nothing to train"),
    ("logging_steps 0", flags("--logging_steps", "0"), "--logging_steps 0.0: must be positive"),
    ("save_steps -1", flags("--save_steps", "-1"), "--save_steps -1.0: must be positive"),
    ("eval_steps 0", flags("--eval_steps", "0"), "--eval_steps 0.0: must be positive"),
    ("save strategy", flags("--save_strategy", "sometimes"), "--save_strategy 'sometimes': choose one of no, steps"),
    ("logging strategy", flags("--logging_strategy", "hourly"), "--logging_strategy 'hourly': choose one of"),
    ("not a number", flags("--lora_r", "eight"), "argument --lora_r/--lora-r: invalid int value: 'eight'"),
    ("eval without data", flags("--eval_strategy", "steps"), "--eval_strategy steps needs --eval_data_path"),
    ("warmup steps", flags("--warmup_steps", "-3"), "--warmup_steps -3.0: must be at least 0"),
    ("warmup ratio", flags("--warmup_ratio", "1.5"), "--warmup_ratio 1.5: must be in [0, 1)"),
    ("max_grad_norm", flags("--max_grad_norm", "-1"), "--max_grad_norm -1.0: must be at least 0"),
    ("weight decay", flags("--weight_decay", "-0.1"), "--weight_decay -0.1: must be at least 0"),
    ("adam beta2", flags("--adam_beta2", "1.0"), "--adam_beta2 1.0: must be in [0, 1)"),
    ("adam epsilon", flags("--adam_epsilon", "0"), "--adam_epsilon 0.0: must be positive"),
    ("negative seed", flags("--seed", "-1"), "--seed -1: must be in [0, 2**32)"),
    ("huge data seed", flags("--data_seed", "5000000000"), "--data_seed 5000000000: must be in [0, 2**32)"),
    ("optimizer name", flags("--optim", "adamw_fancy"), "--optim 'adamw_fancy': choose one of adamw_torch"),
    ("scheduler name", flags("--lr_scheduler_type", "cosine_fancy"), "--lr_scheduler_type 'cosine_fancy': choose"),
    ("unknown report target", flags("--report_to", "carrier_pigeon"), "--report_to 'carrier_pigeon': unknown"),
    ("report target not installed", flags("--report_to", "neptune"), "--report_to neptune: not installed"),
    ("save_total_limit 0", flags("--save_total_limit", "0"), "--save_total_limit 0: keep at least 1 checkpoint"),
    ("workers -1", flags("--dataloader_num_workers", "-1"), "--dataloader_num_workers -1: must be at least 0"),
    ("lora rank 0", flags("--lora_r", "0"), "--lora_r 0: the LoRA rank must be at least 1"),
    ("lora alpha 0", flags("--lora_alpha", "0"), "--lora_alpha 0: must be positive"),
    ("lora dropout 1", flags("--lora_dropout", "1.0"), "--lora_dropout 1.0: must be in [0, 1)"),
    ("lora bias", flags("--lora_bias", "some"), "--lora_bias 'some': choose one of none, all, lora_only"),
    ("max length 4", flags("--model_max_length", "4"), "--model_max_length 4: must be at least 8 tokens"),
    ("truncation", flags("--truncation", "chop"), "--truncation 'chop': choose one of truncate, drop"),
    ("quantization", flags("--q_lora", "--quantization", "int3"), "--quantization 'int3': choose one of"),
    ("precision", flags("--precision", "fp8"), "--precision 'fp8': choose one of auto, bf16, fp16, fp32"),
    ("fp16 and bf16", flags("--fp16", "True", "--bf16", "True"), "--fp16 and --bf16 are both set: choose one"),
    ("drop with lazy", flags("--truncation", "drop", "--lazy_preprocess", "True"), "remove --lazy_preprocess"),
    ("unknown flag", flags("--lora_rank", "8"), "unknown arguments: --lora_rank"),
    # ---- data files
    ("data missing", lambda t, d: ["--data_path", str(t / "missing.json")], "--data_path: file not found"),
    ("data is a directory", lambda t, d: ["--data_path", str(t)], "is a directory, not a file"),
    ("data suffix", lambda t, d: ["--data_path", write(t, "d.txt", "[]")], "must end in .json"),
    ("invalid utf-8", lambda t, d: ["--data_path", write(t, "d.json", b'[{"instruction": "caf\xe9"}]', "wb")],
     "not valid UTF-8 at byte 21 (line 1)"),
    ("json syntax", lambda t, d: ["--data_path", write(t, "d.json", '[\n  {"messages": [}\n]')],
     "d.json:2:17: not valid JSON"),
    ("jsonl bad line", lambda t, d: ["--data_path", write(t, "d.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')],
     "d.jsonl:2:2: not valid JSON"),
    ("jsonl bad line, lazy", lambda t, d: ["--lazy_preprocess", "True", "--data_path",
                                           write(t, "d.jsonl", '{"instruction": "a", "output": "b"}\n\n{oops\n')],
     "d.jsonl:3:2: not valid JSON"),
    ("jsonl bad record, lazy", lambda t, d: ["--lazy_preprocess", "True", "--data_path",
                                             write(t, "d.jsonl", '{"instruction": "a", "output": "b"}\n{"text": 1}\n')],
     "record 1 has keys text; expected 'conversations'"),
    ("jsonl named json", lambda t, d: ["--data_path", write(t, "d.json", '{"a": 1}\n{"a": 2}\n')],
     "one record per line? name the file .jsonl"),
    ("json not a list", lambda t, d: ["--data_path", write(t, "d.json", '{"messages": []}')],
     "expected a JSON list of records, got dict"),
    ("no records", lambda t, d: data(t, []), "no records"),
    ("no assistant turn", lambda t, d: data(t, [{"id": "a7", "conversations": [{"from": "user", "value": "hi"}]}]),
     "record 0 (id 'a7') has no assistant turn"),
    ("unknown role", lambda t, d: data(t, [{"messages": [{"role": "robot", "content": "x"}]}]),
     "turn 0 has role 'robot'"),
    ("unknown record shape", lambda t, d: data(t, [{"text": "x"}]), "expected 'conversations' (Qwen)"),
    ("duplicate key", lambda t, d: ["--data_path", write(t, "d.json", '[{"instruction": "a", "output": "b", '
                                                             '"output": "c"}]')],
     "record 0 has the key 'output' more than once"),
    ("NaN literal", lambda t, d: ["--data_path", write(t, "d.json", '[{"instruction": "a", "input": NaN, '
                                                           '"output": "b"}]')], "record 0 holds the literal NaN"),
    ("nested too deep", lambda t, d: ["--data_path", write(t, "d.json", "[" * 50000 + "]" * 50000)],
     "nested too deeply to parse"),
    ("every reply empty", lambda t, d: data(t, [{"instruction": "a", "output": ""}] * 3),
     "every record's assistant replies are empty"),
    ("bad eval data", lambda t, d: ["--eval_data_path", write(t, "e.json", "[1, 2")], "e.json:1:6: not valid JSON"),
    ("every sample dropped", flags("--model_max_length", "20"), "every sample was dropped"),
    # ---- model, adapter, DeepSpeed, recipe, output directory
    ("model dir missing", lambda t, d: ["--model_name_or_path", str(t / "nope")], "directory not found"),
    ("model without config", lambda t, d: model_copy(t, d, "config.json"), "no config.json"),
    ("model without weights", lambda t, d: model_copy(t, d, ".safetensors"), "no weights (*.safetensors / *.bin)"),
    ("adapter missing", lambda t, d: ["--lora_weight_path", str(t)], "--lora_weight_path: no adapter_config.json"),
    ("deepspeed missing", lambda t, d: ["--deepspeed", str(t / "ds.json")], "--deepspeed: file not found"),
    ("deepspeed bad json", lambda t, d: ["--deepspeed", write(t, "ds.json", '{"zero_optimization": {,}}')],
     "not valid JSON (line 1, column 24"),
    ("recipe missing", lambda t, d: ["--config", str(t / "r.yaml")], "--config: file not found"),
    ("recipe bad yaml", lambda t, d: ["--config", write(t, "r.yaml", "lora_r: [8\n")], "not valid YAML"),
    ("recipe unknown key", lambda t, d: ["--config", write(t, "r.yaml", "lora_rank: 8\n")], "unknown keys lora_rank"),
    ("packing with remote code", remote_code_model, "--packing with a model that runs its own modelling code "
     "(modeling_own.OwnForCausalLM, --trust_remote_code): its attention does not isolate packed samples"),
    ("output dir is a file", lambda t, d: ["--output_dir", write(t, "out", "x")], "exists and is not a directory"),
    ("output dir under a file", lambda t, d: ["--output_dir", os.path.join(write(t, "f", "x"), "out")],
     "cannot be created"),
    ("output dir is the model", lambda t, d: output_into_model(t, d, "same"), "is --model_name_or_path"),
    ("output dir inside the model", lambda t, d: output_into_model(t, d, "inside"), "is inside --model_name_or_path"),
    ("output dir links to the model", lambda t, d: output_into_model(t, d, "link"), "is --model_name_or_path"),
    ("output dir holds the data", output_around_data, "contains --data_path"),
    ("data is a FIFO", fifo_data, "is not a regular file (a FIFO, socket or device)"),
    # ---- the checkpoint's weights and the modules the LoRA flags name, read from the safetensors headers
    ("truncated weights", lambda t, d: damaged_weights(t, d, "truncated"), "model.safetensors: truncated: "),
    ("padded weights", lambda t, d: damaged_weights(t, d, "padded"), "longer than its header describes"),
    ("garbage weights", lambda t, d: damaged_weights(t, d, "garbage"), "its header claims"),
    ("missing shard", lambda t, d: damaged_weights(t, d, "missing shard"),
     "1 weight file(s) named by model.safetensors.index.json are missing (model-00002-of-00002.safetensors)"),
    ("unknown LoRA target", flags("--lora_target_modules", "q_proj", "c_attn"),
     "--lora_target_modules c_attn: no module of that name"),
    ("unknown module to save", flags("--lora_modules_to_save", "wte"), "--lora_modules_to_save wte: no module"),
    ("unknown model_type", lambda t, d: edited_config(t, d, model_type="llama9"),
     "model_type 'llama9' is unknown to transformers"),
    ("no model_type", lambda t, d: edited_config(t, d, model_type=None), "config.json names no model_type"),
    ("no tokenizer files", lambda t, d: model_copy(t, d, ("tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json", "chat_template.jinja")),
     "no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, ...)"),
    # ---- --resume_from_checkpoint, read from the checkpoint's metadata (was a traceback after loading)
    ("resume from a missing checkpoint", lambda t, d: ["--resume_from_checkpoint", str(t / "checkpoint-9")],
     "checkpoint-9': not a directory; pass a checkpoint-N directory"),
    ("resume from an incomplete checkpoint", lambda t, d: checkpoint(t, d, {"adapter_model.safetensors": ""}),
     "not a complete checkpoint (it needs trainer_state.json and the adapter or model weights)"),
    ("resume from a damaged trainer state", lambda t, d: checkpoint(
        t, d, {"trainer_state.json": "{garbage", "adapter_model.safetensors": ""}),
     "trainer_state.json is not a Trainer state (no global_step)"),
    ("resume with another LoRA rank", lambda t, d: [*checkpoint(
        t, d, {"trainer_state.json": '{"global_step": 2}', "adapter_model.safetensors": "",
               "adapter_config.json": '{"r": 16}'}), "--lora_r", "8"],
     "its adapter has r=16, this run asks --lora_r 8"),
]


@pytest.mark.parametrize("name,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_message_nothing_written(name, extra, expected, demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() may set rank variables; keep them here
    out = tmp_path / "run"
    argv = ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(out),
            "--use_lora", "--report_to", "none", *extra(tmp_path, demo)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert expected in err, err[-3000:]
    assert "Traceback" not in err
    assert err.count("finetune.py: error:") == 1
    assert not out.exists(), f"{name}: {out} was created"


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_problems_are_reported_together(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir", str(tmp_path / "o"),
              "--learning_rate", "-1", "--per_device_train_batch_size", "0", "--optim", "x", "--lora_r", "0"])
    err = capsys.readouterr().err
    assert "finetune.py: error: 4 problems:" in err
