"""Test-only hook (put this directory on PYTHONPATH): every rank dumps its trainable weights.

When QLAUNCH_TEST_DUMP_DIR is set, `transformers.Trainer.save_model` is wrapped so that, after
the normal save, each process writes {name: tensor} of its model's trainable parameters to
$QLAUNCH_TEST_DUMP_DIR/rank{RANK}.pt, with the bytes of parameter storage it holds. Under ZeRO-3
and FSDP2 the partitioned parameters are gathered first (a collective: save_model runs on every rank). The tests compare the ranks' files to
prove the processes really trained one model together. It also records the hashes of the packed
GPTQ tensors each quantized layer's kernel reads in its first forward (gathered, under ZeRO-3/FSDP2).

The wrap is installed lazily by an import hook on `transformers.trainer`, so processes that
never import it (torchrun's agent, srun) pay nothing.
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _hooks/
from on_import import PatchOnImport  # noqa: E402

_TARGET = "transformers.trainer"


def _dump(trainer) -> None:
    import resource

    import torch

    out_dir = os.environ["QLAUNCH_TEST_DUMP_DIR"]
    rank = int(os.environ.get("RANK", "0"))
    model = trainer.model
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gathered = [p for _, p in params if hasattr(p, "ds_id")]
    if gathered:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(gathered, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        state = {n: _full(p).detach().to("cpu", copy=True).float() for n, p in params}
    local, full = _param_bytes(model)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "state": state,
                "local_param_bytes": local, "full_param_bytes": full,
                "max_memory_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "rss_at_train_start_kib": getattr(trainer, "_qlaunch_test_rss_at_train", None),
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "from_pretrained_calls": _FROM_PRETRAINED_CALLS[0], "packed_sha256": _PACKED_SHA256},
               os.path.join(out_dir, f"rank{rank}.pt"))


_FROM_PRETRAINED_CALLS = [0]  # models this process read from a checkpoint (rank-0 loading: 0 on other ranks)
_PACKED_SHA256 = {}  # GPTQ layer -> {qweight|qzeros|scales|g_idx: sha256 of the bytes its kernel read}


def _watch_packed_weights(model) -> None:
    """Record, at each GPTQ layer's first forward, the hashes of the packed tensors its kernel reads: from
    inside forward (after every pre-forward hook, so ZeRO-3 / FSDP2 have gathered them)."""
    import hashlib

    import torch

    def digest(tensor) -> str:  # a copy: numpy() would pin the storage FSDP2 frees after forward
        return hashlib.sha256(tensor.detach().cpu().clone().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    def watched(name, forward):
        def forward_and_record(*args, **kwargs):
            if name not in _PACKED_SHA256:
                module = forward.__self__
                _PACKED_SHA256[name] = {key: digest(getattr(module, key))
                                        for key in ("qweight", "qzeros", "scales", "g_idx")}
            return forward(*args, **kwargs)
        return forward_and_record

    for name, module in model.named_modules():
        if hasattr(module, "g_idx") and hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            module.forward = watched(name, module.forward)


def _full(p):
    """FSDP2 parameters are DTensor shards: the whole tensor (collective; save_model runs on every rank)."""
    return p.full_tensor() if type(p).__name__ == "DTensor" else p


def _param_bytes(model) -> tuple[int, int]:
    """(bytes of parameter storage this rank holds, bytes of the whole parameters): FSDP2 (DTensor
    shards) and ZeRO-3 (ds_tensor partitions of ds_numel elements) hold about 1/N."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
            full += p.ds_numel * p.ds_tensor.element_size()
            continue
        shard = p._local_tensor if type(p).__name__ == "DTensor" else p
        local += shard.numel() * shard.element_size()
        full += p.numel() * p.element_size()
    return local, full


def _patch(module) -> None:
    trainer_cls = module.Trainer
    original = trainer_cls.save_model
    if getattr(original, "_qlaunch_test_wrapped", False):
        return

    def save_model(self, output_dir=None, _internal_call=False):
        result = original(self, output_dir, _internal_call)
        if not _internal_call and os.environ.get("QLAUNCH_TEST_DUMP_DIR"):
            _dump(self)
        return result

    save_model._qlaunch_test_wrapped = True
    trainer_cls.save_model = save_model

    from transformers.modeling_utils import PreTrainedModel

    original_from_pretrained = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        _FROM_PRETRAINED_CALLS[0] += 1
        return original_from_pretrained(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    original_train = trainer_cls.train

    def train(self, *args, **kwargs):  # the peak RSS of loading: the model is built, not yet sharded
        import resource

        self._qlaunch_test_rss_at_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return original_train(self, *args, **kwargs)

    trainer_cls.train = train

    original_compute_loss = trainer_cls.compute_loss

    def compute_loss(self, model, *args, **kwargs):
        if not getattr(self, "_qlaunch_test_watching", False):
            self._qlaunch_test_watching = True
            _watch_packed_weights(self.model)  # the unwrapped model: names as in a 1-process run
        return original_compute_loss(self, model, *args, **kwargs)

    trainer_cls.compute_loss = compute_loss

    pace = float(os.environ.get("QLAUNCH_TEST_STEP_SLEEP", "0") or 0)
    if pace > 0:  # crash tests: tiny models train faster than a test can aim a kill -9
        original_step = trainer_cls.training_step

        def training_step(self, *args, **kwargs):
            import time

            time.sleep(pace)
            return original_step(self, *args, **kwargs)

        trainer_cls.training_step = training_step

    slow = os.environ.get("QLAUNCH_TEST_SLOW_SAVE", "")  # "STEP:SECONDS"
    if slow:  # crash tests: a window in the middle of writing checkpoint-STEP to kill -9 the run in
        step, seconds = slow.split(":")
        original_rng = trainer_cls._save_rng_state

        def _save_rng_state(self, output_dir):
            import time

            if os.path.basename(output_dir.rstrip("/")) == f"checkpoint-{step}":
                print(f"QLAUNCH_TEST: writing {output_dir} (model and optimizer written, RNG and state not)",
                      flush=True)
                time.sleep(float(seconds))
            return original_rng(self, output_dir)

        trainer_cls._save_rng_state = _save_rng_state


if any(os.environ.get(k) for k in ("QLAUNCH_TEST_DUMP_DIR", "QLAUNCH_TEST_SLOW_SAVE", "QLAUNCH_TEST_STEP_SLEEP")):
    sys.meta_path.insert(0, PatchOnImport(_TARGET, _patch))

