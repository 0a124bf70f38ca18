"""Loss only on labelled positions: the same loss and gradients as the full-logits path, less work."""
import pytest
import torch

from qlaunch.cli import fit, prepare
from qlaunch.data.labels import IGNORE_INDEX
from qlaunch.train.loss import LABELLED_LOGITS_MODEL_TYPES, labelled_logits_unsupported, labelled_positions

I = IGNORE_INDEX


def test_labelled_positions_are_the_shifted_labels():
    labels = torch.tensor([[I, I, 5, 6, I, 7],
                           [I, 8, 9, I, I, I]])
    mask, targets = labelled_positions(labels)
    # position i predicts label i+1; the last position predicts nothing
    assert mask.tolist() == [[False, True, True, False, True, False],
                             [True, True, False, False, False, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9]


def tiny_lora_model(arch: str, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, head_dim=8, **MOE.get(arch, {}))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common), attn_implementation="sdpa")
    # MoE classes hold their experts fused (no down_proj Linear): the third target is o_proj, and LoRA on the
    # experts themselves through target_parameters
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # non-zero B: every LoRA
                      target_modules=["q_proj", "v_proj", "o_proj" if arch in MOE else "down_proj"],  # weight
                      target_parameters=["mlp.experts.down_proj"] if arch in MOE else None)  # gets a gradient
    return get_peft_model(model, lora)


# the router's load-balancing loss on (output_router_logits), so the equality covers the loss it adds
MOE = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, output_router_logits=True),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, output_router_logits=True),
       "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)}


def batches(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = I                    # a prompt
    labels[0, 15:] = I                   # padding of a shorter row
    labels[2, 12:18] = I                 # a second user turn
    if packed:  # two samples per row, positions restarting, no attention mask
        position_ids = torch.cat([torch.arange(10), torch.arange(14)]).repeat(3, 1)
        labels[:, 10] = I
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": attention_mask}


def loss_and_grads(model, batch, labelled_only: bool):
    model.zero_grad()
    n = (batch["labels"][..., 1:] != I).sum()
    extra = {}
    if labelled_only:
        mask, targets = labelled_positions(batch["labels"])
        extra = {"logits_to_keep": mask, "shift_labels": targets}
    out = model(**batch, num_items_in_batch=n, **extra)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("arch", sorted(LABELLED_LOGITS_MODEL_TYPES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_and_lora_gradients_equal_the_full_logits_path(arch, packed):
    """Every model type on the allow-list, padded and packed (issue 24 item 6)."""
    model = tiny_lora_model(arch)
    assert labelled_logits_unsupported(model) is None
    batch = batches(packed)
    full, full_grads = loss_and_grads(model, batch, labelled_only=False)
    part, part_grads = loss_and_grads(model, batch, labelled_only=True)
    n = int((batch["labels"][..., 1:] != I).sum())
    assert full.logits.shape[:2] == batch["input_ids"].shape
    assert part.logits.shape == (n, 97)  # lm_head ran on the labelled positions only
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-5, atol=0)
    assert full_grads.keys() == part_grads.keys() and len(full_grads) == 2 * (4 if arch in MOE else 3) * 2
    if arch in MOE:
        assert full.aux_loss > 0 and part.aux_loss == full.aux_loss
    for name in full_grads:
        assert full_grads[name].abs().max() > 0, name
        torch.testing.assert_close(part_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # the kept logits are the full path's logits at the labelled positions
    mask, _ = labelled_positions(batch["labels"])
    torch.testing.assert_close(part.logits, full.logits[mask], rtol=1e-5, atol=1e-6)


def test_a_model_without_logits_to_keep_keeps_the_ordinary_path():
    class RemoteCodeLM(torch.nn.Module):  # a forward like Qwen(1)'s: no logits_to_keep
        def forward(self, input_ids=None, labels=None, attention_mask=None):
            return None

    assert "logits_to_keep" in labelled_logits_unsupported(RemoteCodeLM())


def test_classes_off_the_list_and_tools_that_own_the_loss_keep_the_ordinary_path():
    """A class that passes the structural checks but is not on the tested list (gemma2 soft-caps its
    3-D logits after lm_head), and runs with Liger's fused loss or torch.compile, get every position."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma2", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    assert "model type 'gemma2' is not one qlaunch's tests check" in labelled_logits_unsupported(gemma2)
    llama = tiny_lora_model("llama")
    assert labelled_logits_unsupported(llama, SimpleNamespace(use_liger_kernel=False, torch_compile=False)) is None
    assert "--use_liger_kernel" in labelled_logits_unsupported(llama, SimpleNamespace(use_liger_kernel=True))
    assert "--torch_compile" in labelled_logits_unsupported(llama, SimpleNamespace(torch_compile=True))


FAST = ["--max_steps", "3", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--model_max_length", "64", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--disable_tqdm", "True", "--seed", "3", "--use_lora"]


class CountLmHeadRows:
    """Forward hook on lm_head: how many positions it projected."""

    def __init__(self):
        self.rows = 0

    def __call__(self, module, args, output):
        self.rows += args[0].reshape(-1, args[0].shape[-1]).shape[0]


@pytest.mark.parametrize("packing", ["False", "True"])
def test_training_with_gradient_accumulation_equals_the_full_logits_path(demo, tmp_path, packing):
    from transformers import TrainerCallback

    results = {}
    for labelled_only in ("True", "False"):
        counter = CountLmHeadRows()

        class Hook(TrainerCallback):  # counts during training only (not the final save's verification)
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.handle = model.get_output_embeddings().register_forward_hook(counter)

            def on_train_end(self, args, state, control, **kwargs):
                self.handle.remove()

        config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--output_dir",
                          str(tmp_path / labelled_only), "--packing", packing,
                          "--labelled_logits_only", labelled_only, *FAST])
        outcome = fit(config, extra_callbacks=[Hook()])
        trainer = outcome.trainer
        assert trainer.labelled_logits_only is (labelled_only == "True")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results[labelled_only] = losses, weights, counter.rows, trainer.trained_tokens_seen
    (l_part, w_part, rows_part, trained), (l_full, w_full, rows_full, trained_full) = results["True"], results["False"]
    assert trained == trained_full > 0
    assert rows_part == trained < rows_full  # lm_head saw exactly the trained positions
    torch.testing.assert_close(torch.tensor(l_part), torch.tensor(l_full), rtol=1e-5, atol=0)
    for name in w_full:
        torch.testing.assert_close(w_part[name], w_full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eval_loss_equals_the_full_path_and_metrics_get_full_logits(demo, tmp_path):
    """Trainer.evaluate: the same eval loss on both paths; with compute_metrics the logits handed
    over keep their (batch, sequence, vocab) shape."""
    from qlaunch.cli import load_datasets, load_model
    from qlaunch.model.load import load_tokenizer
    from qlaunch.train.trainer import build_trainer

    config = prepare(["--model_name_or_path", demo["model"], "--data_path", demo["train"], "--eval_data_path",
                      demo["eval"], "--output_dir", str(tmp_path), *FAST, "--eval_strategy", "no"])
    tokenizer = load_tokenizer(demo["model"])
    train_data, eval_data = load_datasets(config, tokenizer)
    model, _ = load_model(config)
    trainer = build_trainer(config, model, tokenizer, train_data, eval_data)
    assert trainer.labelled_logits_only
    labelled = trainer.evaluate()["eval_loss"]
    trainer.labelled_logits_only = False
    full = trainer.evaluate()["eval_loss"]
    assert labelled == pytest.approx(full, rel=1e-5)
    shapes = []
    trainer.labelled_logits_only = True
    trainer.compute_metrics = lambda p: shapes.append(p.predictions.shape) or {}
    trainer.evaluate()
    assert shapes and len(shapes[0]) == 3 and shapes[0][-1] == model.config.vocab_size
