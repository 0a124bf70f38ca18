"""Atomic checkpoints and final save: written under a temporary name, renamed when complete.

The Trainer writes a checkpoint in several steps (model, optimizer, scheduler, scaler, RNG states,
trainer_state.json), on several ranks under DeepSpeed. A process killed in the middle leaves a
`checkpoint-N` that `get_last_checkpoint` would pick up as the newest. Here every rank writes into
`OUTPUT/.staging/checkpoint-N`; when all ranks are done (barrier), the main process flushes the
files to disk and renames the directory to `OUTPUT/checkpoint-N` (one atomic rename), then the
ranks meet again before training goes on. `--resume_from_checkpoint auto` therefore only ever sees
complete checkpoints; a leftover staging directory is reported and removed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from qlaunch.config.resume import is_complete, numbered_checkpoints

log = logging.getLogger("qlaunch")

STAGING = ".staging"
FINAL_STAGING = ".staging-final"


def barrier(args) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and args.world_size > 1:
        dist.barrier()


def fsync_tree(path: str) -> None:
    """Flush every file (and the directories) to disk: a rename is only durable after its contents."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(staged: str, final: str) -> None:
    """Move a complete staged directory to its final name (replacing an older one of that name)."""
    fsync_tree(staged)
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointMixin:
    """Trainer mixin: checkpoints are staged and renamed into place when every rank is done."""

    _qlaunch_staging = False

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._qlaunch_staging else run_dir

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # a killed run may have left this step half-written
            shutil.rmtree(os.path.join(run_dir, STAGING, name), ignore_errors=True)
        barrier(self.args)
        self._qlaunch_staging = True
        try:
            super()._save_checkpoint(model, trial)  # writes run_dir/.staging/checkpoint-N
        finally:
            self._qlaunch_staging = False
        barrier(self.args)  # every rank has written its part
        if self.args.should_save:
            before_commit(self)
            commit(os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name))
            try:
                os.rmdir(os.path.join(run_dir, STAGING))
            except OSError:  # not empty: a leftover another resume will report
                pass
            if self.state.best_model_checkpoint and STAGING in self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = os.path.join(run_dir, name)
            from transformers.trainer_utils import rotate_checkpoints

            # The Trainer rotated inside the staging directory; rotate the real ones.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        barrier(self.args)  # nobody trains on (or resumes from) a checkpoint before it exists


def before_commit(trainer) -> None:
    """Called with the staged checkpoint complete, just before the rename (a seam for crash tests)."""


def stage_final(trainer, output_dir: str) -> str:
    """Write the final model/adapter + tokenizer into a staging directory inside output_dir and sync it
    (collective: under ZeRO-3 / FSDP2 the adapter is gathered). Nothing in output_dir itself changes: the
    result is read back from here, and only a verified one is published (publish_final)."""
    staged = os.path.join(output_dir, FINAL_STAGING)
    if trainer.is_world_process_zero():
        shutil.rmtree(staged, ignore_errors=True)
    barrier(trainer.args)
    trainer.save_model(staged)
    barrier(trainer.args)
    if trainer.is_world_process_zero():
        fsync_tree(staged)
    barrier(trainer.args)
    return staged


def publish_final(trainer, staged: str, output_dir: str) -> None:
    """Move the verified staged result into output_dir, the file that makes it loadable last
    (adapter_config.json, or config.json for a full model): a directory that has it has a complete,
    verified result, whenever the process is killed."""
    if trainer.is_world_process_zero():
        last = "adapter_config.json" if os.path.exists(os.path.join(staged, "adapter_config.json")) else "config.json"
        move_into(staged, output_dir, last=last)
    barrier(trainer.args)


def move_into(staged: str, output_dir: str, last: str) -> None:
    """Move a complete staged directory's entries into output_dir, `last` last (the file whose presence
    says the result is complete: a previous one is removed first, so a move cut short leaves an
    incomplete directory, never old metadata beside new weights), then remove the staging."""
    fsync_tree(staged)
    if os.path.exists(os.path.join(output_dir, last)):
        os.remove(os.path.join(output_dir, last))
    for name in sorted(os.listdir(staged), key=lambda n: n == last):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staged, name), target)
    os.rmdir(staged)


@contextlib.contextmanager
def staged_output(output_dir: str, last: str = "config.json"):
    """A staging directory inside output_dir to write a model into; moved into place (move_into)
    when the block ends normally, removed when it raises: an interrupted merge or quantization
    leaves no directory that loads as a model."""
    os.makedirs(output_dir, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=".qlaunch-staging-", dir=output_dir)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    move_into(staged, output_dir, last)


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-N in output_dir; incomplete ones and staging leftovers are
    reported (and the leftovers removed)."""
    if not os.path.isdir(output_dir):
        return None
    staging = os.path.join(output_dir, STAGING)
    if os.path.isdir(staging):
        for name in sorted(os.listdir(staging)):
            log.warning("Skipping %s: a checkpoint interrupted while being written (removed).",
                        os.path.join(staging, name))
        shutil.rmtree(staging, ignore_errors=True)
    for path in numbered_checkpoints(output_dir):
        if is_complete(path):
            return path
        log.warning("Skipping %s: incomplete (no trainer_state.json or weights).", path)
    return None
