"""--torch_compile: how often a compiled LoRA step recompiles on the real collator's batches.

torch.compile guards on input shapes; a batch of a new shape recompiles (automatic dynamic shapes make
the changed dimension symbolic, once per dimension). collate.compile_padding pads packed batches to
model_max_length when compiling, so their sequence length never changes. The compiles here use dynamo's
"aot_eager" backend: dynamo's guards and recompiles are those of inductor (the Trainer's default), the
forward and backward graphs are traced as inductor would receive them, but not code-generated — an
inductor compile of even this tiny model takes tens of seconds on a CPU.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from qlaunch.data.collate import PaddingCollator, compile_padding
from qlaunch.data.packing import PackedDataset
from qlaunch.train.trainer import make_collator

MAX_LENGTH = 128
ROWS = 4


def test_compile_padding_pads_packed_batches_to_the_row_length_only_when_compiling():
    assert compile_padding(True, True, 512) == 512
    assert compile_padding(True, False, 512) is None  # unpacked: dynamic padding, one recompile to a dynamic length
    assert compile_padding(False, True, 512) is None  # not compiling: nothing changes
    assert compile_padding(False, False, 512) is None


def test_make_collator_takes_the_compile_padding_and_keeps_its_default_without():
    tokenizer = SimpleNamespace(pad_token_id=0)
    assert make_collator(tokenizer, on_gpu=False).pad_to_multiple_of is None
    assert make_collator(tokenizer, on_gpu=True).pad_to_multiple_of == 8
    assert make_collator(tokenizer, on_gpu=False, pad_to_multiple_of=compile_padding(False, True, 128)) \
        .pad_to_multiple_of is None
    for on_gpu in (False, True):
        assert make_collator(tokenizer, on_gpu=on_gpu, pad_to_multiple_of=compile_padding(True, True, 128)) \
            .pad_to_multiple_of == 128


def samples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(8, 100)
        ids = [rng.randrange(4, 256) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


def batches(packing: bool, pad_to_multiple_of: int | None, steps: int = 20) -> list[dict]:
    """The first `steps` batches of shuffled epochs, as the Trainer's sampler and the real collator make them;
    the last batch of each epoch is smaller (its rows are what is left)."""
    items = samples(70)
    if packing:
        packed = PackedDataset(items, MAX_LENGTH)
        items = [packed[i] for i in range(len(packed))]
    assert len(items) % ROWS, "the epoch should end with a smaller batch"
    collate = PaddingCollator(0, pad_to_multiple_of=pad_to_multiple_of)
    rng, out = random.Random(1), []
    while len(out) < steps:
        order = list(range(len(items)))
        rng.shuffle(order)
        out += [collate([items[i] for i in order[start:start + ROWS]]) for start in range(0, len(order), ROWS)]
    return out[:steps]


def recompiles(batch_list: list[dict]) -> tuple[int, set]:
    """Recompilations of a compiled LoRA forward + backward over the batches, and the batch shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=256, max_position_embeddings=256)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    for batch in batch_list:
        compiled(**batch).loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])  # one frame: every new graph is a recompile
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs - 1, {tuple(b["input_ids"].shape) for b in batch_list}


def test_packed_batches_padded_for_compile_recompile_only_for_the_last_smaller_batch():
    padded, shapes = recompiles(batches(packing=True, pad_to_multiple_of=compile_padding(True, True, MAX_LENGTH)))
    assert {length for _, length in shapes} == {MAX_LENGTH}
    assert len({rows for rows, _ in shapes}) == 2
    assert padded == 1  # the epoch's last batch: fewer rows (within the bound of 3)
    # Without the padding the sequence length changes too, and costs one more compile.
    unpadded, shapes = recompiles(batches(packing=True, pad_to_multiple_of=None))
    assert len({length for _, length in shapes}) > 1
    assert unpadded == 2 and unpadded > padded


def test_unpacked_batches_recompile_a_bounded_number_of_times():
    """Dynamic padding (compile_padding's None): 20 batches of nearly as many lengths recompile once for the
    sequence length and once for the last batch's rows, then every length fits the dynamic graph."""
    assert compile_padding(True, False, MAX_LENGTH) is None
    count, shapes = recompiles(batches(packing=False, pad_to_multiple_of=None))
    assert len(shapes) > 10
    assert count == 2
