"""Packing isolates samples: in a packed batch every sample's logits and per-token losses equal
those of the sample run alone (fp32), for Qwen2, Llama and Qwen3-MoE (routing is per token), sdpa and eager
attention."""
import json

import pytest
import torch
import torch.nn.functional as F

from qlaunch.data.collate import PaddingCollator
from qlaunch.data.dataset import build_dataset
from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.data.packing import PackedDataset, first_fit_decreasing

SYS = "You are a helpful assistant."


def tiny_model(kind, vocab, attn):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3MoeConfig

    torch.manual_seed(0)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3_moe": Qwen3MoeConfig}[kind]
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if kind == "qwen3_moe" else {}
    # use_cache off, as qlaunch loads every model for training: transformers only derives per-sample
    # masks from position ids when there is no KV cache.
    config = cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, attn_implementation=attn, use_cache=False, **moe)
    return AutoModelForCausalLM.from_config(config).eval()


def per_token_losses(logits, labels):
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


def test_first_fit_decreasing_fills_rows_without_overflow():
    rows = first_fit_decreasing([5, 9, 3, 7, 2, 6], 10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum([5, 9, 3, 7, 2, 6][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 32 tokens in rows of 10: 4 is the minimum


@pytest.mark.parametrize("kind,attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama", "sdpa"), ("qwen3_moe", "sdpa")])
def test_packed_samples_equal_samples_alone(kind, attn, tokenizer, demo, tmp_path):
    samples = build_dataset(demo["train"], tokenizer, max_length=128, system_message=SYS, show_progress=False)
    subset = [samples[i] for i in range(12)]
    packed = PackedDataset(subset, max_length=128)
    assert len(packed) < len(subset)  # several samples share a row
    batch = PaddingCollator(tokenizer.pad_token_id)([packed[0], packed[len(packed) - 1]])
    assert "attention_mask" not in batch  # its absence is what isolates the samples
    model = tiny_model(kind, len(tokenizer), attn)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    for row, row_index in enumerate((0, len(packed) - 1)):
        offset = 0
        for index in packed.rows[row_index]:
            item = subset[index]
            n = len(item["input_ids"])
            ids = torch.tensor([item["input_ids"]])
            labels = torch.tensor(item["labels"])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[row, offset:offset + n], alone, rtol=1e-5, atol=1e-5)
            row_labels = batch["labels"][row, offset:offset + n]
            assert row_labels[0] == IGNORE_INDEX and torch.equal(row_labels[1:], labels[1:])
            torch.testing.assert_close(per_token_losses(logits[row, offset:offset + n], row_labels),
                                       per_token_losses(alone, labels), rtol=1e-5, atol=1e-6)
            offset += n
        # the last token of each sample predicts nothing across the boundary
        assert batch["labels"][row, offset:].eq(IGNORE_INDEX).all()


def test_packing_flag_trains_and_logs_rows(demo, tmp_path, caplog):
    from qlaunch.cli import fit, prepare

    with caplog.at_level("INFO", logger="qlaunch"):
        outcome = fit(prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                               str(tmp_path), "--use_lora", "--packing", "True", "--max_steps", "6",
                               "--per_device_train_batch_size", "2", "--model_max_length", "256", "--report_to",
                               "none", "--save_strategy", "no", "--disable_tqdm", "True", "--learning_rate", "3e-3",
                               "--logging_steps", "1"]))
    assert outcome.status == "done"
    assert "Packing:" in caplog.text and "rows of up to 256 tokens" in caplog.text
    losses = [h["loss"] for h in outcome.trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trained_tokens_seen"] > 0


def test_packing_refuses_lazy_and_group_by_length(demo):
    from qlaunch.config.arguments import parse_namespace
    from qlaunch.config.validate import check_arguments

    base = ["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--packing", "True"]
    assert any("remove --lazy_preprocess" in p for p in check_arguments(parse_namespace(base + ["--lazy_preprocess",
                                                                                                "True"])))
    ns = parse_namespace(base + ["--group_by_length"])
    assert ns.train_sampling_strategy == "group_by_length"
    assert any("--packing and --group_by_length" in p for p in check_arguments(ns))


@pytest.mark.parametrize("impl, flatten", [("flash_attention_2", True), ("flash_attention_3", True),
                                           ("kernels-community/flash-attn2", True), ("sdpa", False),
                                           ("eager", False), (None, False)])
def test_flash_attention_gets_packed_rows_as_one_row(impl, flatten):
    from qlaunch.data.collate import flattens_packed_rows

    assert flattens_packed_rows(impl) is flatten


def test_flattened_rows_are_what_flash_attention_isolates_and_change_nothing_for_sdpa(tokenizer, demo):
    """transformers' flash-attention path finds sample boundaries in position ids only for a batch of
    one row (its own _is_packed_sequence, read here): several packed rows would be attended whole.
    The flattened batch (pad_to_multiple_of as on GPUs) gives every token the same loss under sdpa."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    samples = build_dataset(demo["train"], tokenizer, max_length=128, system_message=SYS, show_progress=False)
    packed = PackedDataset([samples[i] for i in range(12)], max_length=128)
    rows = [packed[i] for i in range(3)]
    by_row = PaddingCollator(tokenizer.pad_token_id)(rows)
    flat = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8, flatten_packed=True)(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert flat["input_ids"].shape == (1, -(-tokens // 8) * 8)
    assert not _is_packed_sequence(by_row["position_ids"], batch_size=3)  # the hazard: rows taken whole
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    restarts = int((flat["position_ids"][0] == 0).sum())
    assert restarts == sum(len(packed.rows[i]) for i in range(3)) + (flat["input_ids"].shape[1] > tokens)
    model = tiny_model("qwen2", len(tokenizer), "sdpa")
    with torch.no_grad():
        row_logits = model(input_ids=by_row["input_ids"], position_ids=by_row["position_ids"]).logits
        flat_logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
    offset = 0
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        torch.testing.assert_close(flat_logits[offset:offset + n], row_logits[r, :n], rtol=1e-5, atol=1e-5)
        assert flat["labels"][0, offset:offset + n].tolist() == row["labels"]
        offset += n
    assert (flat["labels"][0, offset:] == IGNORE_INDEX).all()


def scanned_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The definition, scanning every row for each sample (O(samples x rows)): the reference."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_the_tree_packer_gives_exactly_the_rows_of_the_scan(seed):
    import random

    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 512, 2048])
    n = rng.choice([0, 1, 7, 300, 3000])
    # long-tailed lengths like chat data, some at or above the capacity (a row of their own)
    lengths = [max(1, min(int(rng.paretovariate(1.3) * capacity / 12), capacity + 5)) for _ in range(n)]
    assert first_fit_decreasing(lengths, capacity) == scanned_first_fit_decreasing(lengths, capacity)


def test_the_plan_is_stored_with_the_cached_data_and_read_by_later_processes(demo, tokenizer, tmp_path, monkeypatch,
                                                                             caplog):
    import qlaunch.data.packing as packing

    planned = []
    real = packing.first_fit_decreasing
    monkeypatch.setattr(packing, "first_fit_decreasing", lambda *a: planned.append(1) or real(*a))
    samples = build_dataset(demo["train"], tokenizer, max_length=128, system_message=SYS, show_progress=False,
                            cache_dir=str(tmp_path / "cache"), num_proc=1)
    first = PackedDataset(samples, 128, samples.cache_entry)
    plan = tmp_path / "cache" / samples.cache_entry.rsplit("/", 1)[-1] / "packing-128.json"
    assert plan.is_file() and planned == [1]
    again = PackedDataset(build_dataset(demo["train"], tokenizer, max_length=128, system_message=SYS,
                                        show_progress=False, cache_dir=str(tmp_path / "cache"), num_proc=1,
                                        verify_cache=False), 128, samples.cache_entry)
    assert planned == [1] and again.rows == first.rows  # read, not recomputed
    assert first.rows == real(samples.lengths, 128)
    plan.write_text(json.dumps({"capacity": 128, "samples": 3, "rows": [[0]]}))  # not these samples
    assert PackedDataset(samples, 128, samples.cache_entry).rows == first.rows and planned == [1, 1]
    assert "does not describe these samples" in caplog.text
    assert PackedDataset(samples, 64, samples.cache_entry).rows == real(samples.lengths, 64)  # its own plan
    assert (plan.parent / "packing-64.json").is_file()
