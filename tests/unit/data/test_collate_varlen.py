"""Flattened packed batches (flash-attention) carry flash-attention's varlen arguments: cu_seq_lens_q/_k
and max_length_q/_k, equal to what transformers would re-derive from position_ids in every layer;
sdpa/eager batches carry none. No flash kernel runs on CPU: the model tests show the arguments pass
through the model's forward (and its loss) to every layer's attention function, here sdpa's."""
from __future__ import annotations

import inspect
import random

import pytest
import torch

from qlaunch.data.collate import PaddingCollator, flattens_packed_rows, varlen_kwargs
from qlaunch.data.labels import IGNORE_INDEX

PAD = 0
VARLEN_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def sample(n: int, start: int = 10) -> dict:
    ids = [start + i % 100 for i in range(n)]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "position_ids": list(range(n))}


def packed_row(*lengths: int) -> dict:
    samples = [sample(n, start=10 + 7 * i) for i, n in enumerate(lengths)]
    return {k: [v for s in samples for v in s[k]] for k in ("input_ids", "labels", "position_ids")}


def flash_collator(pad_to_multiple_of=None) -> PaddingCollator:
    assert flattens_packed_rows("flash_attention_2")
    return PaddingCollator(PAD, pad_to_multiple_of=pad_to_multiple_of, flatten_packed=True)


def test_flattened_rows_carry_every_sample_boundary():
    # three rows: two samples, one sample, three samples (one of them a single token)
    batch = flash_collator()([packed_row(5, 3), packed_row(4), packed_row(2, 1, 6)])
    assert batch["input_ids"].shape == (1, 21)
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 5, 8, 12, 14, 15, 21]
    assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int
    assert batch["max_length_q"] == batch["max_length_k"] == 6


def test_padding_to_a_multiple_is_one_more_sequence():
    batch = flash_collator(pad_to_multiple_of=8)([packed_row(5, 3), packed_row(4), packed_row(2, 1, 6)])
    assert batch["input_ids"].shape == (1, 24)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 14, 15, 21, 24]
    assert batch["max_length_q"] == batch["max_length_k"] == 6
    # the padding run can be the longest sequence
    batch = flash_collator(pad_to_multiple_of=16)([packed_row(2, 1)])
    assert batch["cu_seq_lens_k"].tolist() == [0, 2, 3, 16]
    assert batch["max_length_q"] == batch["max_length_k"] == 13


def test_a_batch_of_one_row_of_one_sample():
    batch = flash_collator()([packed_row(7)])
    assert batch["cu_seq_lens_q"].tolist() == [0, 7]
    assert batch["max_length_q"] == batch["max_length_k"] == 7


@pytest.mark.parametrize("impl", ["sdpa", "eager", None])
def test_sdpa_and_eager_batches_carry_no_varlen_arguments(impl):
    collate = PaddingCollator(PAD, pad_to_multiple_of=8, flatten_packed=flattens_packed_rows(impl))
    packed = collate([packed_row(5, 3), packed_row(4)])
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape == (2, 8)
    unpacked = collate([{k: v for k, v in sample(n).items() if k != "position_ids"} for n in (5, 3)])
    assert set(unpacked) == {"input_ids", "labels", "attention_mask"}


def test_unpacked_rows_under_flash_attention_carry_no_varlen_arguments():
    """Rows without position ids are padded rows with an attention mask, from which transformers unpads."""
    batch = flash_collator()([{k: v for k, v in sample(n).items() if k != "position_ids"} for n in (5, 3)])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


@pytest.mark.parametrize("seed", range(8))
def test_the_collator_agrees_with_transformers_own_derivation(seed):
    """transformers derives the same arguments from position_ids when they are not given
    (_flash_attention_forward -> _prepare_from_posids -> prepare_fa_kwargs_from_position_ids)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rng = random.Random(seed)
    rows = [packed_row(*[rng.randint(1, 9) for _ in range(rng.randint(1, 4))]) for _ in range(rng.randint(1, 4))]
    batch = flash_collator(pad_to_multiple_of=rng.choice([None, 8, 16]))(rows)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == int(max_q) and batch["max_length_k"] == int(max_k)
    assert varlen_kwargs(batch["position_ids"][0])["max_length_q"] == batch["max_length_q"]


def test_transformers_flash_attention_takes_these_arguments():
    """The names are the ones transformers' flash-attention path reads; a rename there fails here."""
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs, _flash_attention_forward
    from transformers.utils.generic import TransformersKwargs

    params = inspect.signature(_flash_attention_forward).parameters
    assert VARLEN_KEYS <= set(params)
    assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(flash_attention_forward).parameters.values())
    assert VARLEN_KEYS <= set(FlashAttentionKwargs.__annotations__)
    assert VARLEN_KEYS <= set(TransformersKwargs.__annotations__)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def attention_calls(monkeypatch):
    """The keyword arguments of every call of the sdpa attention function (which then runs as usual)."""
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", recording)
    return calls


def test_a_tiny_llama_takes_the_batch_with_its_varlen_arguments(attention_calls):
    """The whole batch, as the Trainer passes it (`model(**inputs)`, with num_items_in_batch): forward and
    loss accept the arguments, every layer's attention function receives them, and under sdpa (which
    ignores them) logits and loss are those of the batch without them."""
    model = tiny_llama()
    batch = flash_collator(pad_to_multiple_of=8)([packed_row(5, 3), packed_row(4), packed_row(2, 1, 6)])
    num_items = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=num_items)
        assert len(attention_calls) == model.config.num_hidden_layers
        for kwargs in attention_calls:
            assert kwargs["cu_seq_lens_q"] is batch["cu_seq_lens_q"] and kwargs["max_length_k"] == 6
        plain = model(**{k: v for k, v in batch.items() if k not in VARLEN_KEYS}, num_items_in_batch=num_items)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.loss, plain.loss)


def test_a_peft_wrapped_tiny_llama_passes_them_through(attention_calls):
    """qlaunch trains a PeftModel: its forward hands unknown keywords on to the base model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = flash_collator()([packed_row(5, 3), packed_row(4)])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert [c["cu_seq_lens_k"].tolist() for c in attention_calls] == [[0, 5, 8, 12]] * 2
