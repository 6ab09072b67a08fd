"""The HF Trainer, with the optimizer built by `hf_lowrank.build_optimizer` and per-step loss tracking."""

import torch
from transformers import Trainer

from ..optim import build_optimizer
from .arguments import OptimizerArguments
from .diagnostics import SpectralDiagnosticsCallback


class LowRankTrainer(Trainer):
    """`transformers.Trainer` whose optimizer routes factor pairs to Spectron and everything else to AdamW.

    Everything else is the stock Trainer: the LR schedule scales every group's lr (Spectron's and AdamW's) by the
    same factor, gradient accumulation, clipping, bf16 autocast, logging and checkpointing (the optimizer's
    state_dict holds tensors only and reloads with ``weights_only=True``) work as they do for AdamW.
    """

    def __init__(self, *args, optimizer_args: OptimizerArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_args = optimizer_args or OptimizerArguments()
        self._step_loss = 0.0
        self._micro_steps = 0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            options = self.optimizer_args
            self.optimizer = build_optimizer(
                self.model if model is None else model,
                options.optimizer,
                lr=self.args.learning_rate,
                adamw_lr=options.adamw_learning_rate,
                weight_decay=self.args.weight_decay,
                adamw_weight_decay=options.adamw_weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                **options.spectron_options(),
            )
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The returned loss is this micro-batch's share of the step's mean loss: their sum is the step loss.
        self._step_loss += loss.item()
        self._micro_steps += 1
        if self._micro_steps >= self.current_gradient_accumulation_steps:
            for callback in self._diagnostics_callbacks():
                callback.record_loss(self._step_loss)
            self._step_loss, self._micro_steps = 0.0, 0
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line: attach the diagnostics gathered since the last one
            for callback in self._diagnostics_callbacks():
                logs.update(callback.pop_logs())
        super().log(logs, start_time)

    def _diagnostics_callbacks(self) -> list[SpectralDiagnosticsCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, SpectralDiagnosticsCallback)]
