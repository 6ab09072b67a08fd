"""The HF Trainer, with the optimizer built by `hf_lowrank.build_optimizer`, step guards and crash-safe checkpoints."""

import errno
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
from transformers.utils import is_torch_xla_available

from ..optim import build_optimizer
from .arguments import OptimizerArguments, RunArguments, check_optimizer_flags
from .checkpointing import (
    EXTRA_STATE_NAME,
    CheckpointError,
    check_weights_fit,
    commit_checkpoint,
    crash_point,
    latest_complete_checkpoint,
    load_state_file,
    read_extra_state,
    remove_leftovers,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    staging_dir,
    write_json_atomic,
)
from .diagnostics import LossSpikeDetector, SpectralDiagnosticsCallback
from .guards import APPLY, ROLLBACK, GuardedOptimizer, NonFiniteTrainingError, StepGuard, all_finite
from .world import differences as world_differences
from .world import model_world, tokenizer_world

logger = logging.getLogger(__name__)

# Settings a checkpoint records (R23). At resume, those that the checkpoint's optimizer and LR-scheduler state would
# silently replace (`load_state_dict` restores the saved hyperparameters of every param group and the saved base
# learning rates) are refused when they differ; every other one takes its new value, with a warning.
REFUSED_AT_RESUME = (
    "optimizer",
    "learning_rate",
    "adamw_learning_rate",
    "weight_decay",
    "adamw_weight_decay",
    "adam_beta1",
    "adam_beta2",
    "spectron_momentum",
    "ns_steps",
    "power_iters",
    "rebalance_every",
)


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

    Six private `Trainer` methods and `set_initial_training_values` (public by name, called only by the training
    loop) are overridden, because Transformers offers no public hook at those points. Each override's docstring
    starts with "Replaces `Trainer.<name>`" and says which behaviour it changes and why; docs/trainer_internals.md
    lists them with every other private member used, and ``tests/test_trainer_overrides.py`` pins the upstream
    source of each (checked against Transformers 5.17 and 5.24), so a release that changes one fails CI by name.
    """

    def __init__(
        self, *args, optimizer_args: OptimizerArguments | None = None, guard: StepGuard | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.optimizer_args = optimizer_args or OptimizerArguments()
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:  # ours builds it: refuse Trainer's flags
            check_optimizer_flags(self.args)
        self.guard = guard or StepGuard()
        if self.guard.spike_detector is None:  # a detector given to the diagnostics callback is fed by the guard
            detectors = [c.spike_detector for c in self._diagnostics_callbacks() if c.spike_detector is not None]
            self.guard.spike_detector = detectors[0] if detectors else None
        for callback in self._diagnostics_callbacks():  # the guard feeds its detector every step, exactly once
            if callback.spike_detector is self.guard.spike_detector:
                callback.feeds_detector = False
        if self.guard.spike_action == "rollback" and self.args.save_strategy == SaveStrategy.NO:
            raise ValueError("--spike_action rollback reloads the last checkpoint: set --save_strategy steps.")
        self._step_loss = 0.0
        self._micro_steps = 0
        self._last_step_loss: float | None = None
        self._rollback_pending = False
        # Optimizer steps whose batches were consumed but then undone by a rollback: the data loader is this many
        # steps ahead of `global_step`, which a resume must reproduce (R3).
        self._data_step_offset = 0
        self._last_applied_step = 0  # the last step whose update reached the weights
        # The run's data (`world.data_world`, set by `pretrain`) and whether a resume may change the tokenizer or the
        # model definition (`--allow_world_change`); the tokenizer and the model are read here (R29).
        self.data_world: dict | None = None
        self.allow_world_change = False
        if self.optimizer is not None:  # given through `optimizers=(optimizer, scheduler)`: guard it too
            self.optimizer = GuardedOptimizer(self.optimizer, self._should_step)

    # ------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            # The caller chose the optimizer class itself (`optimizer_cls_and_kwargs`): Trainer builds it; guarded.
            super().create_optimizer(model)
            self.optimizer = GuardedOptimizer(self.optimizer, self._should_step)
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
                eps=self.args.adam_epsilon,
                **options.spectron_options(),
            )
            self.optimizer = GuardedOptimizer(optimizer, self._should_step)
        return self.optimizer

    def _should_step(self) -> bool:
        """Asked by the guarded optimizer right before each update, on every rank."""
        assert self._last_step_loss is not None, "optimizer.step() outside the training loop"
        grads = (p.grad for group in self.optimizer.param_groups for p in group["params"])
        step = self.state.global_step + 1
        grads_finite = all_finite(grads)
        if not (grads_finite and math.isfinite(self._last_step_loss)):
            # Skipping helps only when the weights are finite; if an earlier update overflowed them, every later
            # loss is NaN and the guard's "nothing reached the weights" would be false (R22). Checked only here,
            # on a non-finite step, so a healthy step pays nothing.
            bad = self._nonfinite_tensor()
            if bad is not None:
                raise self._overflow_error(bad, step)
        verdict = self.guard.decide(self._last_step_loss, grads_finite, step=step, device=self.args.device)
        self._last_step_loss = None
        self._rollback_pending = verdict == ROLLBACK
        if verdict == APPLY:
            self._last_applied_step = step
        return verdict == APPLY

    def _nonfinite_tensor(self) -> str | None:
        """The name of the first parameter or optimizer-state tensor holding NaN/inf, or None."""
        names = {}
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param).all():
                return f"the parameter {name}"
            names[param] = name
        if self.optimizer is not None:
            for param, state in self.optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                        return f"the optimizer state {key!r} of {names.get(param, 'a parameter')}"
        return None

    def _overflow_error(self, tensor: str, step: int, unsaved: str | None = None) -> NonFiniteTrainingError:
        last = latest_complete_checkpoint(self.args.output_dir)
        intact = (
            f"The newest complete checkpoint, {last}, holds only finite values (a save refuses NaN/inf)"
            if last
            else "No complete checkpoint was saved before it"
        )
        return NonFiniteTrainingError(
            f"Step {step}: {tensor} holds NaN/inf although every update applied had a finite loss and finite "
            f"gradients: an optimizer update itself overflowed (the last one applied was step "
            f"{self._last_applied_step}).{f' {unsaved} was not saved.' if unsaved else ''} {intact}. Lower "
            "--learning_rate or keep gradient clipping on (--max_grad_norm), then resume from that checkpoint."
        )

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
        self._data_step_offset += spike_step - saved_step  # those steps' batches stay consumed
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
        self._check_data_fits()
        self._data_step_offset = 0
        if checkpoint is not None:
            check_weights_fit(checkpoint, self.model)
            self._load_extra_state(checkpoint)
        result = super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        bad = self._nonfinite_tensor()  # the caller saves the final model next: never a non-finite one (R22)
        if bad is not None:
            raise self._overflow_error(bad, self.state.global_step, unsaved="The final model")
        return result

    def _check_data_fits(self) -> None:
        """Refuse, before the first step, a training or validation split too small for one batch: the run would
        train no step (and save an untrained model) or its evaluation would score nothing (no ``eval_loss``)."""
        args = self.args
        splits = [("training", self.train_dataset, args.per_device_train_batch_size, "--per_device_train_batch_size")]
        if self.eval_dataset is not None and not isinstance(self.eval_dataset, dict):
            splits.append(
                ("validation", self.eval_dataset, args.per_device_eval_batch_size, "--per_device_eval_batch_size")
            )
        for split, dataset, batch_size, flag in splits:
            if dataset is None or not hasattr(dataset, "__len__"):  # a stream: its length is unknown
                continue
            needed = batch_size * args.world_size if args.dataloader_drop_last else 1
            if len(dataset) < needed:
                most = max(1, len(dataset) // args.world_size)
                raise ValueError(
                    f"The {split} split has {len(dataset)} sequences, fewer than one batch ({flag} {batch_size} x "
                    f"{args.world_size} processes, and --dataloader_drop_last drops a partial batch): "
                    f"{'no step would train' if split == 'training' else 'evaluation would score nothing'}. Lower "
                    f"{flag} to at most {most}, lower --block_size, or add data"
                    f"{' (or raise --validation_split_percentage)' if split == 'validation' else ''}."
                )

    def _run_settings(self) -> dict:
        """The settings this run trains with, recorded in each checkpoint and compared at resume (R23)."""
        args, options = self.args, self.optimizer_args
        settings = {
            "optimizer": options.optimizer,
            "learning_rate": args.learning_rate,
            "adamw_learning_rate": options.adamw_learning_rate,
            "weight_decay": args.weight_decay,
            "adamw_weight_decay": options.adamw_weight_decay,
            "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2,
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "warmup_steps": args.warmup_steps,
            "max_steps": args.max_steps,
            "max_grad_norm": args.max_grad_norm,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "seed": args.seed,
            **self.guard.settings(),
        }
        if options.optimizer != "adamw":
            settings.update(
                {f"spectron_{k}" if k == "momentum" else k: v for k, v in options.spectron_options().items()}
            )
        return settings

    def _check_settings(self, saved: dict | None, path: str) -> None:
        """Refuse settings that the checkpoint's state would silently replace; warn about the others, which this
        run honours (R23)."""
        if saved is None:
            logger.warning("%s records no settings (saved by an older version): they cannot be compared.", path)
            return
        current = self._run_settings()
        changed = {k: (saved[k], current[k]) for k in sorted(saved.keys() & current.keys()) if saved[k] != current[k]}
        refused = {k: v for k, v in changed.items() if k in REFUSED_AT_RESUME}
        if refused:
            details = ", ".join(f"--{k} {new} (the checkpoint's: {old})" for k, (old, new) in refused.items())
            raise ValueError(
                f"Cannot resume from {os.path.dirname(path)} with {details}: its optimizer and LR-schedule state "
                "carry the old values and would silently replace the new ones. Resume with the checkpoint's values, "
                "or start a new run in a new --output_dir."
            )
        for key, (old, new) in changed.items():
            logger.warning("Resuming with --%s %s (the checkpoint was trained with %s).", key, new, old)

    def _world(self) -> dict:
        """What this run trains on, as `world` records it: data (if known), tokenizer and model definition."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return {
            "data": self.data_world,
            "tokenizer": tokenizer_world(self.processing_class) if self.processing_class is not None else None,
            "model": model_world(model.config),
        }

    def _check_world(self, saved: dict | None, path: str) -> None:
        """Name every difference between the checkpoint's world and this run's; refuse a changed tokenizer or model
        definition unless ``allow_world_change``, warn about changed data (R29)."""
        if saved is None:
            logger.warning("%s records no data/tokenizer/model fingerprint (an older checkpoint): not compared.", path)
            return
        refused, warned = world_differences(saved, self._world())
        if refused and not self.allow_world_change:
            raise ValueError(
                f"Cannot resume from {os.path.dirname(path)}: {'; '.join(refused)}. The checkpoint's weights were "
                "trained in another world, so they would mean something else here. Resume with the checkpoint's "
                "tokenizer (saved in the checkpoint folder) and model settings, start a new run in a new "
                "--output_dir, or pass --allow_world_change if this is deliberate."
            )
        for line in refused:
            logger.warning("Resuming although %s (--allow_world_change).", line)
        for line in warned:
            logger.warning("Resuming although %s.", line)

    def _load_extra_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, EXTRA_STATE_NAME)
        if not os.path.isfile(path):
            logger.info("%s has no %s: the step guard and spike detector start fresh.", checkpoint, EXTRA_STATE_NAME)
            return
        state = read_extra_state(path)  # checked: a malformed file is a CheckpointError naming it
        self._check_settings(state.get("settings"), path)
        self._check_world(state.get("world"), path)
        self.guard.load_state_dict(state["guard"])
        self._data_step_offset = state.get("data_step_offset", 0)

    def set_initial_training_values(self, args, dataloader):
        """Replaces `Trainer.set_initial_training_values`'s epoch count (the other values are the original's).

        With ``max_steps`` and a sized dataset it plans ``ceil(max_steps / steps_per_epoch)`` epochs, exactly the
        batches ``max_steps`` steps use. A rollback leaves the batches after its checkpoint consumed, so the run
        would run out of epochs short of ``max_steps`` and save that as final. Each rollback rewinds at most
        ``max_steps`` steps, so ``max_rollbacks`` more such spans always suffice; the loop still ends at
        ``max_steps``, and the learning-rate schedule is not affected (it follows ``max_steps``)."""
        values = list(super().set_initial_training_values(args, dataloader))
        guard = self.guard
        if args.max_steps > 0 and guard.spike_action == ROLLBACK and guard.max_rollbacks > 0:
            max_steps, steps_per_epoch = values[6], values[1]
            values[0] = max(values[0], math.ceil(max_steps * (1 + guard.max_rollbacks) / steps_per_epoch))
        return tuple(values)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, *args, **kwargs):
        """Replaces `Trainer._init_training_state`'s data position at resume (it calls the original first).

        The stock Trainer skips ``global_step`` steps of batches; a checkpoint saved after a rollback had
        consumed ``global_step + data_step_offset`` of them, so the resumed run would replay batches and never
        see others (R3, R4). Private: the only place where the skip is decided before the first batch."""
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, *args, **kwargs
        )
        if self._data_step_offset and not self.args.ignore_data_skip and self.state.global_step > 0:
            data_step = self.state.global_step + self._data_step_offset
            epochs_trained = data_step // num_update_steps_per_epoch
            steps_in_epoch = (data_step % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps
        return epochs_trained, steps_in_epoch

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Replaces `Trainer._load_from_checkpoint`'s failure modes (the loading itself is the original's).

        The stock method loads with ``strict=False`` (missing or extra tensors are only a warning) and lets a
        truncated safetensors file surface as a bare ``SafetensorError``; this one refuses a checkpoint of another
        model before loading anything and names the file it could not read (R2). Also called by the rollback, which reloads weights mid-run."""
        check_weights_fit(resume_from_checkpoint, self.model if model is None else model)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except (SafetensorError, OSError, RuntimeError) as error:
            files = ", ".join(str(p) for p in sorted(Path(resume_from_checkpoint).glob("model*.safetensors")))
            raise CheckpointError(f"Could not load the weights {files} (truncated or corrupted?): {error}") from error

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Replaces `Trainer._load_optimizer_and_scheduler` on a single process or DDP (DeepSpeed, FSDP and XLA
        keep the original).

        The stock method skips missing files silently and loads a state of another optimizer with a bare
        ``KeyError``/``ValueError``; this one warns when the files are missing (a ``save_only_model``
        checkpoint), checks each file before ``torch.load(weights_only=True)`` (`load_state_file`), and says
        which setting to change when the state does not fit (R2, R23). Also called by the rollback."""
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
        """Replaces `Trainer._load_rng_state`'s error only: a torn or foreign RNG file raises a `CheckpointError`
        naming the file, instead of an unpickling error from deep inside ``torch.load`` (R2)."""
        try:
            super()._load_rng_state(checkpoint)  # torch.load(weights_only=True) with numpy's types allowed
        except Exception as error:  # noqa: BLE001 - re-raised with the file's name
            name = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
            raise CheckpointError(
                f"Could not load {os.path.join(checkpoint, name)} (torn, or not a plain tensor file): {error}"
            ) from error

    # ------------------------------------------------------------------------------------------ end of training
    def _run_epoch(self, *args, **kwargs):
        """Replaces `Trainer._run_epoch`'s start (private: the only hook before the first step) with one check: a run
        resumed from a checkpoint taken at ``max_steps`` (a kill during the final save or evaluation, then a
        re-run) trains no step. The stock loop checks ``max_steps`` only after a step, so it would train one step
        past the end, change the weights and rotate the true final checkpoint away (R19)."""
        if 0 < self.state.max_steps <= self.state.global_step:
            logger.info("Step %d is already max_steps: nothing left to train.", self.state.global_step)
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ save
    def _save_checkpoint(self, model, trial) -> None:
        """Replaces `Trainer._save_checkpoint`, which writes straight into ``checkpoint-N``, so a crash or a full
        disk leaves a torn folder that ``resume_from_checkpoint=True`` then picks.

        Here everything is written into a staging folder (`_write_checkpoint_files`, which keeps the original's
        file list and order), fsynced and renamed to ``checkpoint-N``, and a manifest written last marks it
        complete (R1). Added on top: a refusal to save NaN/inf weights (R22), a disk-full error that removes the
        partial save and names the intact checkpoint, the guard's state (`EXTRA_STATE_NAME`), and a rotation that
        counts only checkpoints that verify and keeps the one saved as the run stops (R28). The body cannot call the
        original: its target folder is fixed inside it. Re-check it against upstream when upgrading Transformers."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), str(staging_dir(run_dir, name))
        bad = self._nonfinite_tensor()  # what a save writes must be finite (R22); every rank holds the same
        if bad is not None:
            raise self._overflow_error(bad, self.state.global_step, unsaved=final)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a crash at this very step
        self.accelerator.wait_for_everyone()  # every rank: the staging folder is clean before anyone writes
        try:
            self._write_checkpoint_files(staging, run_dir)
        except (OSError, RuntimeError) as error:
            if not _out_of_space(error, run_dir):
                raise
            free = shutil.disk_usage(run_dir).free
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # a partial save is garbage and holds the space
            last = latest_complete_checkpoint(run_dir)
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while saving {final} ({free / 2**20:.1f} MiB were free on the disk of "
                f"{run_dir}; the writer reported: {error}). The partial save was removed"
                + (
                    f"; the newest complete checkpoint, {last}, is intact"
                    if last
                    else "; no complete checkpoint exists"
                )
                + ". Free some space or point --output_dir at a larger disk, then run again to resume.",
            ) from error

        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG states are per rank)
        if self.args.should_save:
            commit_checkpoint(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            keep = {self.state.best_model_checkpoint} if self.state.best_model_checkpoint else set()
            if self.control.should_training_stop:  # saved as the run stops (SIGTERM, max_steps): never rotated (R28)
                keep.add(final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=keep)

    def _write_checkpoint_files(self, staging: str, run_dir: str) -> None:
        """Every file of a checkpoint, written into ``staging``: the part of `Trainer._save_checkpoint` that is kept,
        in its order, except that the best checkpoint is recognised before the staging folder has its final name
        (the original checks that the folder exists), and the guard's state is added."""
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
            extra = {
                "guard": self.guard.state_dict(),
                "settings": self._run_settings(),
                "data_step_offset": self._data_step_offset,
                "world": self._world(),
            }
            write_json_atomic(os.path.join(staging, EXTRA_STATE_NAME), extra)
        crash_point("state")


def _out_of_space(error: BaseException, folder: str) -> bool:
    """Whether a failed write ran out of disk space. `torch.save` reports a short write as ``unexpected pos``
    without the OS error, so besides ENOSPC/EDQUOT/EFBIG anywhere in the chain, a disk with less free space than
    one checkpoint needs (the newest one's size, at least 16 MiB) counts as full."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        cause = cause.__cause__ or cause.__context__
    last = latest_complete_checkpoint(folder)
    needed = sum(p.stat().st_size for p in Path(last).rglob("*") if p.is_file()) if last else 0
    return shutil.disk_usage(folder).free < max(needed, 16 * 2**20)


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
    trainer = LowRankTrainer(
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
    trainer.allow_world_change = run_args.allow_world_change
    return trainer
