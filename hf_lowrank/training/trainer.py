"""The HF Trainer, with the optimizer built by `hf_lowrank.build_optimizer`, step guards and crash-safe checkpoints."""

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
from transformers.utils import is_torch_xla_available

from ..optim import build_optimizer
from .arguments import OptimizerArguments, RunArguments
from .checkpointing import (
    EXTRA_STATE_NAME,
    CheckpointError,
    check_weights_fit,
    commit_checkpoint,
    crash_point,
    latest_complete_checkpoint,
    load_state_file,
    remove_leftovers,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    staging_dir,
    write_json_atomic,
)
from .diagnostics import LossSpikeDetector, SpectralDiagnosticsCallback
from .guards import APPLY, ROLLBACK, GuardedOptimizer, StepGuard, all_finite

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME = "trainer_state.json", "optimizer.pt", "scheduler.pt"


class LowRankTrainer(Trainer):
    """`transformers.Trainer` whose optimizer routes factor pairs to Spectron and everything else to AdamW.

    On top of the stock Trainer (LR schedule for every group alike, accumulation, clipping, bf16, logging):

    * every optimizer step first goes through ``guard`` (a :class:`~hf_lowrank.training.guards.StepGuard`):
      a NaN/inf loss or gradient, or a loss spike under ``spike_action`` skip/rollback, skips the update before
      the optimizer runs. A skipped step still counts: ``global_step`` and the LR schedule advance, so the
      learning rate stays a function of the step number (as after a resume); only the update is dropped;
    * checkpoints are saved atomically with a completion manifest, ``resume_from_checkpoint=True`` picks the
      newest complete and verified one, and every state file loads with ``weights_only=True``
      (see :mod:`hf_lowrank.training.checkpointing`);
    * the guard's counters and the spike detector's state travel in each checkpoint (JSON).
    """

    def __init__(
        self, *args, optimizer_args: OptimizerArguments | None = None, guard: StepGuard | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.optimizer_args = optimizer_args or OptimizerArguments()
        self.guard = guard or StepGuard()
        if self.guard.spike_detector is None:  # a detector given to the diagnostics callback is fed by the guard
            detectors = [c.spike_detector for c in self._diagnostics_callbacks() if c.spike_detector is not None]
            self.guard.spike_detector = detectors[0] if detectors else None
        if self.guard.spike_action == "rollback" and self.args.save_strategy == SaveStrategy.NO:
            raise ValueError("--spike_action rollback reloads the last checkpoint: set --save_strategy steps.")
        self._step_loss = 0.0
        self._micro_steps = 0
        self._last_step_loss: float | None = None
        self._rollback_pending = False
        if self.optimizer is not None:  # given through `optimizers=(optimizer, scheduler)`: guard it too
            self.optimizer = GuardedOptimizer(self.optimizer, self._should_step)

    # ------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            options = self.optimizer_args
            adamw_lr = options.adamw_learning_rate
            if options.optimizer == "adamw" and adamw_lr == self.args.learning_rate:
                adamw_lr = None  # `resolve_learning_rate` filled it in as lr: nothing is ignored, so no warning
            optimizer = build_optimizer(
                self.model if model is None else model,
                options.optimizer,
                lr=self.args.learning_rate,
                adamw_lr=adamw_lr,
                weight_decay=self.args.weight_decay,
                adamw_weight_decay=options.adamw_weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                **options.spectron_options(),
            )
            self.optimizer = GuardedOptimizer(optimizer, self._should_step)
        return self.optimizer

    def _should_step(self) -> bool:
        """Asked by the guarded optimizer right before each update, on every rank."""
        assert self._last_step_loss is not None, "optimizer.step() outside the training loop"
        grads = (p.grad for group in self.optimizer.param_groups for p in group["params"])
        verdict = self.guard.decide(
            self._last_step_loss, all_finite(grads), step=self.state.global_step + 1, device=self.args.device
        )
        self._last_step_loss = None
        self._rollback_pending = verdict == ROLLBACK
        return verdict == APPLY

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._rollback_pending and self._micro_steps == 0:
            # After the spike step was logged (and saved, if due) and before the next batch trains.
            self._roll_back()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The returned loss is this micro-batch's share of the step's mean loss: their sum is the step loss.
        self._step_loss += loss.item()
        self._micro_steps += 1
        if self._micro_steps >= self.current_gradient_accumulation_steps:
            self._last_step_loss, self._step_loss, self._micro_steps = self._step_loss, 0.0, 0
        return loss

    def _roll_back(self) -> None:
        """Reload weights, optimizer, LR schedule and step counter from the last complete checkpoint; the data
        loader is not rewound, so training continues with the batches after the spike."""
        self._rollback_pending = False
        checkpoint = latest_complete_checkpoint(self.args.output_dir)
        if checkpoint is None:
            logger.warning("Loss spike but no complete checkpoint to roll back to yet: only its update was skipped.")
            return
        spike_step = self.state.global_step
        self._load_from_checkpoint(checkpoint)
        self._load_optimizer_and_scheduler(checkpoint)
        saved_step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
        self.state.global_step = saved_step
        self._globalstep_last_logged = saved_step
        self.guard.rollbacks += 1
        logger.warning(
            "Rolled back from step %d to %s (rollback %d of at most %d); continuing with the next batches.",
            spike_step,
            checkpoint,
            self.guard.rollbacks,
            self.guard.max_rollbacks,
        )

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line: attach the diagnostics gathered since the last one
            for callback in self._diagnostics_callbacks():
                logs.update(callback.pop_logs())
            logs.update(self.guard.logs())
        super().log(logs, start_time)

    def _diagnostics_callbacks(self) -> list[SpectralDiagnosticsCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, SpectralDiagnosticsCallback)]

    # ------------------------------------------------------------------------------------------ resume
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``resume_from_checkpoint=True`` resumes from the newest *complete, verified* checkpoint in
        ``output_dir``; a path is checked (exists, manifest matches) before anything is loaded."""
        if self.args.should_save:
            remove_leftovers(self.args.output_dir)
        checkpoint = None
        if resume_from_checkpoint is True:
            checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint; "
                    "leave it unset to start from scratch."
                )
        elif resume_from_checkpoint:
            checkpoint = resolve_resume_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            check_weights_fit(checkpoint, self.model)
            self._load_extra_state(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _load_extra_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, EXTRA_STATE_NAME)
        if not os.path.isfile(path):
            logger.info("%s has no %s: the step guard and spike detector start fresh.", checkpoint, EXTRA_STATE_NAME)
            return
        self.guard.load_state_dict(json.loads(Path(path).read_text())["guard"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        check_weights_fit(resume_from_checkpoint, self.model if model is None else model)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except (SafetensorError, OSError, RuntimeError) as error:
            files = ", ".join(str(p) for p in sorted(Path(resume_from_checkpoint).glob("model*.safetensors")))
            raise CheckpointError(f"Could not load the weights {files} (truncated or corrupted?): {error}") from error

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available():
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer_file = os.path.join(checkpoint, OPTIMIZER_NAME)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
            logger.warning(
                "%s has no %s/%s (saved with save_only_model?): the optimizer state and LR schedule start fresh.",
                checkpoint,
                OPTIMIZER_NAME,
                SCHEDULER_NAME,
            )
            return
        on_device = self.args.world_size > 1 and self.args.device.type != "cpu"
        state = load_state_file(optimizer_file, map_location=self.args.device if on_device else "cpu")
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ValueError(
                f"The optimizer state {optimizer_file} does not fit this run's optimizer ({error}). Resume with the "
                "--optimizer and model settings it was saved with, or start a new run in a new --output_dir."
            ) from error
        self.lr_scheduler.load_state_dict(load_state_file(scheduler_file))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)  # torch.load(weights_only=True) with numpy's types allowed
        except Exception as error:  # noqa: BLE001 - re-raised with the file's name
            name = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
            raise CheckpointError(
                f"Could not load {os.path.join(checkpoint, name)} (torn, or not a plain tensor file): {error}"
            ) from error

    # ------------------------------------------------------------------------------------------ save
    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, made atomic: everything is written into a staging folder, which is
        fsynced and renamed to ``checkpoint-N``; a manifest written last marks it complete (R1)."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), str(staging_dir(run_dir, name))
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a crash at this very step
        self.accelerator.wait_for_everyone()  # every rank: the staging folder is clean before anyone writes

        self.save_model(staging, _internal_call=True)
        crash_point("model")
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        crash_point("optimizer")
        if self.args.should_save:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    key = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[key], list):
                        self.state.stateful_callbacks[key].append(callback.state())
                    else:
                        self.state.stateful_callbacks[key] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
            write_json_atomic(os.path.join(staging, EXTRA_STATE_NAME), {"guard": self.guard.state_dict()})
        crash_point("state")

        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG states are per rank)
        if self.args.should_save:
            commit_checkpoint(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            keep = {self.state.best_model_checkpoint} if self.state.best_model_checkpoint else set()
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=keep)


def build_step_guard(run_args: RunArguments) -> StepGuard:
    """The step guard of ``run_args`` (non-finite policy, loss-spike detector and policy, divergence stop)."""
    spike_detector = LossSpikeDetector(
        window=run_args.spike_window,
        threshold=run_args.spike_threshold,
        min_increase=run_args.spike_min_increase,
        warmup=run_args.spike_warmup,
    )
    return StepGuard(
        max_consecutive_nonfinite=run_args.max_consecutive_nonfinite,
        spike_detector=spike_detector,
        spike_action=run_args.spike_action,
        max_rollbacks=run_args.max_rollbacks,
        divergence_patience=run_args.divergence_patience,
    )


def build_trainer(
    model,
    training_args,
    optimizer_args: OptimizerArguments,
    run_args: RunArguments,
    *,
    train_dataset,
    eval_dataset=None,
    processing_class=None,
    data_collator=None,
    guard: StepGuard | None = None,
    callbacks: tuple = (),
) -> LowRankTrainer:
    """The `LowRankTrainer` of a pretraining run, with its step guard and `SpectralDiagnosticsCallback`: what
    `hf-lowrank pretrain` trains with, and what the stability study trains every run with."""
    from transformers import default_data_collator

    guard = guard or build_step_guard(run_args)
    diagnostics = SpectralDiagnosticsCallback(
        every=run_args.diagnostics_steps or max(1, int(training_args.logging_steps)),
        spike_detector=guard.spike_detector,  # the detector the guard feeds: diag/loss_spikes counts its spikes
    )
    return LowRankTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator or default_data_collator,
        processing_class=processing_class,
        callbacks=[diagnostics, *callbacks],
        optimizer_args=optimizer_args,
        guard=guard,
    )
