"""Preemption (R24): on SIGTERM, save a checkpoint at the next step boundary and stop cleanly.

Cluster schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM and wait a grace period before SIGKILL. The
handler only sets a flag; at the end of the optimizer step in progress the Trainer saves ``checkpoint-N`` (the
crash-safe save of R1) and stops, and `hf-lowrank pretrain` exits with :data:`PREEMPTED_EXIT_CODE` without the final
save and evaluation. Re-running the same command resumes from ``checkpoint-N``: at most the step in progress is lost,
and the result is bitwise the uninterrupted run's (R3).

Under several processes the ranks may get the signal at different moments: every rank takes the maximum of the
flags with one all-reduce at every step end (issued by every rank, R17), so all stop at the same step.
"""

import logging
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .checkpointing import CheckpointError, latest_complete_checkpoint, verify_checkpoint

logger = logging.getLogger(__name__)

# 128 + SIGTERM, what a shell reports for a job ended by SIGTERM: not 0, so `pretrain ... && next-step` stops.
PREEMPTED_EXIT_CODE = 143


class TrainingPreempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; ``message`` (`preemption_message`) says which checkpoint
    to resume from."""

    def __init__(self, output_dir, step: int, message: str):
        self.output_dir, self.step = output_dir, step
        super().__init__(message)


def preemption_message(output_dir, step: int, explicit_resume: bool = False) -> str:
    """What a run stopped by SIGTERM at ``step`` tells its user: the checkpoint to resume from, named only if it exists
    and verifies (R28). That is the one saved at ``step`` (rotation never deletes it), else the newest complete one.
    The advice is "re-run the same command" only when that command resumes from it; after a run started with
    ``--resume_from_checkpoint`` (``explicit_resume``: the same command would go back there), or when a newer complete
    checkpoint exists (which a plain re-run would pick), it names the ``--resume_from_checkpoint`` to pass."""
    saved = Path(output_dir) / f"checkpoint-{step}"
    newest = latest_complete_checkpoint(output_dir)  # warns about (and names) every newer one that fails
    try:
        verify_checkpoint(saved)  # hashed at its save, so only its file sizes and times are read here
    except CheckpointError as error:
        text = f"Stopped by SIGTERM at step {step}, but its checkpoint cannot be resumed from ({error})."
        if newest is None:
            return f"{text} No complete checkpoint is left in {output_dir}: a re-run starts from step 0."
        target, text = newest, f"{text} The newest complete checkpoint is {newest}."
    else:
        target, text = str(saved), f"Stopped by SIGTERM at step {step}: {saved} is complete."
    if target == newest and not explicit_resume:
        return f"{text} Re-run the same command to resume from it."
    return f"{text} Re-run with --resume_from_checkpoint {target} to resume from it."


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM during `Trainer.train` into a checkpoint at the next step end and a stop.

    The handler is installed at the start of training (from the main thread only; elsewhere Python cannot install
    one) and the previous one restored at its end, so a SIGTERM during the final save or evaluation ends the process
    as usual, and the resume then finishes exactly at ``max_steps`` (R19).
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True  # acted on at the step end: saving here, mid-step, would save a half-updated model

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def stop_requested(self, args) -> bool:
        """Whether any rank got SIGTERM; every rank must call this at the same point."""
        flag = self.received
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            flags = torch.tensor([float(flag)], device=args.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flag = bool(flags.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_requested(args):
            logger.warning("SIGTERM received: saving checkpoint-%d and stopping.", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control
