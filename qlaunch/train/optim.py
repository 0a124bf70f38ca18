"""LoRA+ (--loraplus_lr_ratio): the B matrices learn `ratio` times faster than the A matrices.

peft builds the parameter groups (peft.optimizers.create_loraplus_optimizer); this mixin hands it the
optimizer class and arguments the Trainer would have used (--optim, betas, epsilon, fused), so LoRA+
changes the learning rates and nothing else. The scheduler scales every group from its own initial
rate, so warm-up and decay keep the ratio.
"""
from __future__ import annotations


class LoraPlusMixin:
    """Trainer mixin: a LoRA+ optimizer when loraplus_lr_ratio is set (build_trainer sets it)."""

    loraplus_lr_ratio: float | None = None

    def create_optimizer(self, model=None):
        if not self.loraplus_lr_ratio or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, lr=lr,
                                                   loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer
