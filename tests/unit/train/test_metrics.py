"""Real-token counts of packed rows when the pad token is the EOS token (issue 24 item 9)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from qlaunch.data.collate import PaddingCollator
from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.train.metrics import TrainedTokenCountMixin, packed_real_tokens

EOS = PAD = 2  # Llama-3 / Mistral: the pad token is the EOS token


def sample(n: int, prompt: int = 2) -> dict:
    """n tokens ending in a trained EOS; the first `prompt` tokens are not trained."""
    ids = list(range(10, 10 + n - 1)) + [EOS]
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(n))}


def packed_row(*samples) -> dict:
    return {k: [v for s in samples for v in s[k]] for k in ("input_ids", "labels", "position_ids")}


def test_packed_rows_count_every_real_token_including_eos_equal_to_pad():
    batch = PaddingCollator(PAD)([packed_row(sample(5), sample(3)), packed_row(sample(4))])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 8)
    real = packed_real_tokens(batch["input_ids"], batch["labels"], batch["position_ids"], PAD)
    assert int(real) == 12
    assert int((batch["input_ids"] != PAD).sum()) == 9  # the Trainer's count: three EOS tokens lost


def test_a_flattened_row_with_padding_to_a_multiple():
    batch = PaddingCollator(PAD, pad_to_multiple_of=16, flatten_packed=True)(
        [packed_row(sample(5), sample(3)), packed_row(sample(4))])
    assert batch["input_ids"].shape == (1, 16)
    assert int(packed_real_tokens(batch["input_ids"], batch["labels"], batch["position_ids"], PAD)) == 12


def test_a_full_row_and_a_last_sample_that_starts_with_an_untrained_prompt_are_all_real():
    batch = PaddingCollator(PAD)([packed_row(sample(4), sample(4))])
    assert int(packed_real_tokens(batch["input_ids"], batch["labels"], batch["position_ids"], PAD)) == 8


def test_the_mixin_counts_on_the_device_and_reads_the_counts_back_only_when_logged():
    """Packed rows by their layout, padded ones by the attention mask (as the Trainer counts them), trained
    tokens beside them; nothing is gathered or read back until a log (or a checkpoint) flushes them."""
    class Base:
        def log(self, logs, *args, **kwargs):
            self.logged = dict(logs, num_input_tokens_seen=self.state.num_input_tokens_seen)

    class Counting(TrainedTokenCountMixin, Base):
        pass

    gathered = []
    trainer = Counting()
    trainer.args = SimpleNamespace(include_num_input_tokens_seen="non_padding", device="cpu")
    trainer.state = SimpleNamespace(num_input_tokens_seen=0)
    trainer.processing_class = SimpleNamespace(pad_token_id=PAD)
    trainer.accelerator = SimpleNamespace(gather=lambda t: gathered.append(t) or torch.cat([t, t]))  # 2 "ranks"
    packed = PaddingCollator(PAD)([packed_row(sample(5), sample(3)), packed_row(sample(4))])
    padded = PaddingCollator(PAD)([{k: v for k, v in sample(5).items() if k != "position_ids"},
                                   {k: v for k, v in sample(3).items() if k != "position_ids"}])
    trainer._track_num_input_tokens(packed)
    trainer._track_num_input_tokens(padded)
    assert not gathered and trainer.state.num_input_tokens_seen == 0  # nothing read back yet
    trained = int((packed["labels"][..., 1:] != IGNORE_INDEX).sum() + (padded["labels"][..., 1:] != IGNORE_INDEX).sum())
    trainer.log({"loss": 1.0})
    assert len(gathered) == 1  # one collective for both counts
    assert trainer.logged["num_input_tokens_seen"] == trainer.state.num_input_tokens_seen == 2 * (12 + 8)
    assert trainer.trained_tokens_seen == 2 * trained > 0
    trainer.log({"loss": 1.0})  # nothing new: every rank still takes part, the totals stay
    assert len(gathered) == 2 and trainer.state.num_input_tokens_seen == 40
