"""--group_by_length takes the lengths qlaunch's dataset already has (qlaunch/train/sampling.py) instead of
reading every sample, and orders batches exactly as transformers' own sampler does."""
from __future__ import annotations

import time

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from qlaunch.cli import load_datasets, load_model, prepare
from qlaunch.data.dataset import TokenizedDataset
from qlaunch.model.load import load_tokenizer
from qlaunch.train.metrics import process_age_seconds
from qlaunch.train.trainer import build_trainer


def test_group_by_length_reads_no_sample_and_orders_as_transformers(demo, tmp_path, monkeypatch):
    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                      str(tmp_path / "out"), "--use_lora", "--group_by_length", "--cache_dir", str(tmp_path / "cache"),
                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
                      "--report_to", "none", "--model_max_length", "64"])
    tokenizer = load_tokenizer(demo["model"])
    train, _ = load_datasets(config, tokenizer)
    assert not isinstance(train.items, list)  # the cached, memory-mapped rows
    trainer = build_trainer(config, load_model(config)[0], tokenizer, train)

    reads = []
    monkeypatch.setattr(TokenizedDataset, "__getitem__", lambda self, i: reads.append(i) or self.items[i])
    sampler = trainer._get_train_sampler()
    assert reads == []  # no sample read to measure it
    assert isinstance(sampler, LengthGroupedSampler) and sampler.batch_size == 2 * 3
    monkeypatch.undo()
    expected = [len(train[i]["input_ids"]) for i in range(len(train))]
    assert sampler.lengths == expected

    reference = LengthGroupedSampler(6, dataset=train)  # transformers measuring every sample itself
    assert reference.lengths == expected
    torch.manual_seed(7)
    ours = list(sampler)
    torch.manual_seed(7)
    assert ours == list(reference) and sorted(ours) == list(range(len(train)))


def test_process_age_is_this_process_lifetime():
    age = process_age_seconds()
    assert age is not None and 0 < age < time.monotonic()  # started before now, after the machine booted
    time.sleep(0.2)
    assert 0.15 < process_age_seconds() - age < 5
