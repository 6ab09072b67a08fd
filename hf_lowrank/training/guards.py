"""Step guards: non-finite losses and gradients never reach the weights (R10); an explicit loss-spike policy (R11).

Before every optimizer step, :class:`StepGuard` sees the step's loss and whether every gradient is finite and
returns what to do with the update: apply it, skip it, or skip it and roll back to the last complete checkpoint.
:class:`GuardedOptimizer` is the thin wrapper that asks it and runs the wrapped optimizer's ``step`` only on
"apply", so a skipped step leaves parameters and optimizer state untouched.

Under torch.distributed the decision is made on numbers reduced across ranks (the mean loss and "any rank is
non-finite"), with one all-reduce that every rank issues at every optimizer step, so all ranks decide alike.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable

import torch

from .diagnostics import LossSpikeDetector

logger = logging.getLogger(__name__)

SPIKE_ACTIONS = ("log", "skip", "rollback")
APPLY, SKIP, ROLLBACK = "apply", "skip", "rollback"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps with a NaN/inf loss or gradient: the run stops."""


class TrainingDivergedError(RuntimeError):
    """The loss stayed above the first step's loss for ``divergence_patience`` consecutive steps: the run stops."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor (None entries ignored) is free of NaN and inf, with one host sync."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def reduce_step_signals(loss: float, nonfinite: bool, device: torch.device | None = None) -> tuple[float, bool]:
    """``(mean loss over ranks, any rank non-finite)``; the identity without an initialized process group.

    Every rank must call this at every step (it is a collective), never from a rank-0-only branch.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss, nonfinite
    signals = torch.tensor([loss if math.isfinite(loss) else 0.0, float(nonfinite)], dtype=torch.float64, device=device)
    dist.all_reduce(signals, op=dist.ReduceOp.SUM)
    return signals[0].item() / dist.get_world_size(), signals[1].item() > 0


class StepGuard:
    """Decides, before each optimizer step, whether its update is applied.

    Args:
        max_consecutive_nonfinite: a step whose loss or gradient is NaN/inf is skipped; this many consecutive
            such steps are tolerated and one more stops the run with :class:`NonFiniteTrainingError` (0 stops at
            the first one).
        spike_detector: a :class:`LossSpikeDetector` fed with every finite step loss (mean over ranks), or None.
        spike_action: on a spike, ``"log"`` counts it and applies the update, ``"skip"`` drops the update,
            ``"rollback"`` drops it and asks the trainer to reload the last complete checkpoint.
        max_rollbacks: rollbacks allowed in a run; a spike after that stops the run.
        divergence_patience: stop the run with :class:`TrainingDivergedError` once the (finite) loss has stayed
            above the first step's loss for this many consecutive steps: a diverged run, whose remaining steps
            would be wasted compute. 0 turns the check off.

    Counters (``guard/*`` in the logs) and the detector's state are plain numbers, saved with every checkpoint.
    """

    def __init__(
        self,
        max_consecutive_nonfinite: int = 5,
        spike_detector: LossSpikeDetector | None = None,
        spike_action: str = "log",
        max_rollbacks: int = 3,
        divergence_patience: int = 0,
    ):
        if max_consecutive_nonfinite < 0:
            raise ValueError(f"max_consecutive_nonfinite must be >= 0, got {max_consecutive_nonfinite}.")
        if spike_action not in SPIKE_ACTIONS:
            raise ValueError(f"spike_action must be one of {list(SPIKE_ACTIONS)}, got {spike_action!r}.")
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}.")
        if divergence_patience < 0:
            raise ValueError(f"divergence_patience must be >= 0 (0: off), got {divergence_patience}.")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.spike_detector = spike_detector
        self.spike_action = spike_action
        self.max_rollbacks = max_rollbacks
        self.divergence_patience = divergence_patience
        self.initial_loss: float | None = None  # the first finite step loss of the run
        self.steps_above_initial = 0  # consecutive steps whose loss exceeded it
        self.skipped_steps = 0  # updates not applied, for any reason
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.rollbacks = 0

    def decide(self, loss: float, grads_finite: bool, step: int, device: torch.device | None = None) -> str:
        """APPLY, SKIP or ROLLBACK for optimizer step ``step`` (1-based); identical on every rank."""
        loss, nonfinite = reduce_step_signals(loss, not (grads_finite and math.isfinite(loss)), device)
        if nonfinite:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite > self.max_consecutive_nonfinite:
                raise NonFiniteTrainingError(
                    f"Step {step}: {self.consecutive_nonfinite} consecutive optimizer steps had a NaN/inf loss or "
                    f"gradient (more than --max_consecutive_nonfinite={self.max_consecutive_nonfinite}); stopping. "
                    "No update from these steps reached the weights and the last complete checkpoint is intact. "
                    "Lower --learning_rate, check the data, or use --bf16 instead of fp16."
                )
            self.skipped_steps += 1
            logger.warning(
                "Step %d: non-finite loss or gradient; the update was skipped (%d in a row, %d in all).",
                step,
                self.consecutive_nonfinite,
                self.nonfinite_steps,
            )
            return SKIP
        self.consecutive_nonfinite = 0
        self._check_divergence(loss, step)
        if self.spike_detector is None or not self.spike_detector.update(loss):
            return APPLY
        if self.spike_action == "log":
            logger.warning("Step %d: loss spike (%.4g); update applied (--spike_action log).", step, loss)
            return APPLY
        if self.spike_action == "rollback" and self.rollbacks >= self.max_rollbacks:
            raise NonFiniteTrainingError(
                f"Step {step}: loss spike ({loss:.4g}) after {self.rollbacks} rollbacks (--max_rollbacks="
                f"{self.max_rollbacks}); stopping. Lower --learning_rate or raise --spike_threshold."
            )
        self.skipped_steps += 1
        logger.warning("Step %d: loss spike (%.4g); update skipped (--spike_action %s).", step, loss, self.spike_action)
        return ROLLBACK if self.spike_action == "rollback" else SKIP

    def _check_divergence(self, loss: float, step: int) -> None:
        if self.initial_loss is None:
            self.initial_loss = loss
            return
        self.steps_above_initial = self.steps_above_initial + 1 if loss > self.initial_loss else 0
        if self.divergence_patience and self.steps_above_initial >= self.divergence_patience:
            raise TrainingDivergedError(
                f"Step {step}: the loss ({loss:.4g}) has stayed above the first step's loss ({self.initial_loss:.4g}) "
                f"for {self.steps_above_initial} steps (--divergence_patience={self.divergence_patience}): the run "
                "diverged; stopping. Lower --learning_rate, or set --divergence_patience 0 to train on regardless."
            )

    def logs(self) -> dict[str, float]:
        return {
            "guard/skipped_steps": self.skipped_steps,
            "guard/nonfinite_steps": self.nonfinite_steps,
            "guard/rollbacks": self.rollbacks,
        }

    def settings(self) -> dict:
        """The policy's settings by flag name (recorded in checkpoints; at resume the new ones apply, R23)."""
        settings = {
            "spike_action": self.spike_action,
            "max_rollbacks": self.max_rollbacks,
            "max_consecutive_nonfinite": self.max_consecutive_nonfinite,
            "divergence_patience": self.divergence_patience,
        }
        detector = self.spike_detector
        if detector is not None:
            settings.update(
                spike_window=detector.window,
                spike_threshold=detector.threshold,
                spike_min_increase=detector.min_increase,
                spike_warmup=detector.warmup,
            )
        return settings

    def state_dict(self) -> dict:
        return {
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "rollbacks": self.rollbacks,
            "initial_loss": self.initial_loss,
            "steps_above_initial": self.steps_above_initial,
            "spike_detector": None if self.spike_detector is None else self.spike_detector.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters and the detector's history; the settings stay this guard's own (the new flags of a
        resumed run are honoured, not replaced by the checkpoint's)."""
        check_state_dict(state)
        self.skipped_steps, self.nonfinite_steps = state["skipped_steps"], state["nonfinite_steps"]
        self.consecutive_nonfinite, self.rollbacks = state["consecutive_nonfinite"], state["rollbacks"]
        # Absent from checkpoints written before the divergence check existed: it restarts from the next loss.
        self.initial_loss, self.steps_above_initial = state.get("initial_loss"), state.get("steps_above_initial", 0)
        detector = self.spike_detector
        if detector is not None and state["spike_detector"] is not None:
            configured = detector.window, detector.threshold, detector.min_increase, detector.warmup
            detector.load_state_dict(state["spike_detector"])
            detector.window, detector.threshold, detector.min_increase, detector.warmup = configured
            detector.history = deque(detector.history, maxlen=detector.window)  # the newest losses of the window


_COUNTERS = ("skipped_steps", "nonfinite_steps", "consecutive_nonfinite", "rollbacks")
_DETECTOR_KEYS = ("window", "threshold", "min_increase", "warmup", "history", "steps", "spikes", "last_spike_step")


def check_state_dict(state) -> None:
    """Raise ValueError unless ``state`` has the shape `StepGuard.state_dict` gives (checked before any of it is
    used, so a malformed checkpoint file is reported, not a KeyError)."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(state, dict):
        raise ValueError(f"the guard state is a {type(state).__name__}, not an object")
    bad = [key for key in _COUNTERS if not count(state.get(key))]
    if bad:
        raise ValueError(f"the guard state lacks non-negative integer counters {bad}")
    if "spike_detector" not in state:
        raise ValueError("the guard state has no 'spike_detector' entry")
    detector = state["spike_detector"]
    if detector is not None:
        missing = [key for key in _DETECTOR_KEYS if not isinstance(detector, dict) or key not in detector]
        if missing:
            raise ValueError(f"the spike detector's state lacks {missing}")
        history_ok = isinstance(detector["history"], list) and all(
            isinstance(x, (int, float)) for x in detector["history"]
        )
        if not (history_ok and count(detector["steps"]) and count(detector["spikes"])):
            raise ValueError("the spike detector's history, steps or spikes are malformed")


class GuardedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer; ``step`` runs it only when ``should_step()`` is true. Everything else is delegated.

    Like accelerate's ``AcceleratedOptimizer`` it does not call ``Optimizer.__init__``: the state, param groups
    and ``state_dict`` are the wrapped optimizer's, so checkpoints are unchanged by the wrapper.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, should_step: Callable[[], bool]):
        self.optimizer = optimizer
        self.should_step = should_step

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups):
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if not self.should_step():
            return None
        return self.optimizer.step(closure)

    def __getattr__(self, name: str):
        if name == "optimizer":  # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"
