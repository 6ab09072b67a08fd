"""Stability diagnostics: spectral norms of the factors and of the weight update, and loss spikes.

The paper traces low-rank instability to the spectral norm of the weight update ‖ΔW‖₂, so that is what we
watch. Everything here is optimizer-agnostic: it reads the model before and after `optimizer.step()`, so the
naive AdamW baseline is measured the same way as Spectron.
"""

import inspect
import math
import warnings
from collections import deque

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..modeling_lowrank import LowRankLinear
from ..optim.routing import dense_projections


def _nonfinite(*matrices: torch.Tensor) -> torch.Tensor | None:
    """NaN if any input holds a NaN, inf if any holds an inf (float32 scalars), None if all are finite.

    Exploded weights are exactly what these diagnostics exist to report, so they must never raise. LAPACK must not
    be handed a non-finite matrix: oneMKL's SVD/QR raise `LinAlgError` ("SLASCL parameter 4 was incorrect") on some
    CPUs (AMD EPYC) where others return NaN."""
    if any(torch.isnan(m).any() for m in matrices):
        return torch.tensor(math.nan)
    if any(torch.isinf(m).any() for m in matrices):
        return torch.tensor(math.inf)
    return None


def _largest_singular_value(matrix: torch.Tensor) -> torch.Tensor:
    """``‖matrix‖₂`` in ``matrix``'s dtype; inf/NaN (never an error) for non-finite input or a failed solver."""
    bad = _nonfinite(matrix)
    if bad is not None:
        return bad.to(matrix.dtype)
    try:
        return torch.linalg.matrix_norm(matrix, ord=2)
    except torch.linalg.LinAlgError:  # did not converge: a measurement never stops training
        return torch.tensor(math.nan, dtype=matrix.dtype)


@torch.no_grad()
def spectral_norm(matrix: torch.Tensor) -> torch.Tensor:
    """Largest singular value, in float32 (float64 input stays float64). For a thin factor (long × r) this is an SVD
    of cost O(long · r²). NaN for a matrix holding NaN, inf for one holding inf."""
    return _largest_singular_value(matrix if matrix.dtype == torch.float64 else matrix.float())


@torch.no_grad()
def lowrank_difference_spectral_norm(
    up_before: torch.Tensor, down_before: torch.Tensor, up_after: torch.Tensor, down_after: torch.Tensor
) -> torch.Tensor:
    """‖up_after·down_after − up_before·down_before‖₂ without forming an (out × in) matrix, in float64.

    A late-training update is ~1e-6 of the weights, so the two products agree to about float32's precision and
    their difference, formed as L·R with L = [up_after, −up_before], is float32 rounding noise (seen: ‖ΔW‖₂/lr 1.76
    where float64 gives 0.41). So the factor differences are taken first (exact: close floats subtract without
    rounding), ΔW = ΔU·down_after + up_before·ΔD = L·R with L = [ΔU, up_before] (out × 2r) and
    R = [down_after; ΔD] (2r × in), and everything after runs in float64. With L = Q_L T_L and Rᵀ = Q_R T_R (thin
    QR), ‖L R‖₂ = ‖T_L T_Rᵀ‖₂, a (2r × 2r) problem. Returns a float32 scalar: NaN or inf when a factor is not
    finite (an exploded update), never an error.
    """
    bad = _nonfinite(up_before, down_before, up_after, down_after)
    if bad is not None:
        return bad
    up_before, down_before = up_before.double(), down_before.double()
    up_after, down_after = up_after.double(), down_after.double()
    left = torch.cat([up_after - up_before, up_before], dim=1)  # (out, 2r)
    right = torch.cat([down_after, down_after - down_before], dim=0)  # (2r, in)
    return _product_norm(left, right).float()


@torch.no_grad()
def lowrank_product_spectral_norm(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """‖up·down‖₂ of a factor pair without forming the (out × in) product: with up = Q_U T_U and
    downᵀ = Q_D T_D (thin QR), ‖up·down‖₂ = ‖T_U T_Dᵀ‖₂, an (r × r) problem. The small product is taken in
    float64, so factors whose product overflows float32 still give a finite norm. Returns a float32 scalar
    (inf beyond float32's range, NaN/inf for non-finite factors, never an error)."""
    bad = _nonfinite(up, down)
    if bad is not None:
        return bad
    return _product_norm(up.float(), down.float()).float()


def _product_norm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``‖left · right‖₂`` through thin QRs of ``left`` (m × k) and ``rightᵀ`` (n × k); finite input only."""
    try:
        _, t_left = torch.linalg.qr(left)  # (k, k)
        _, t_right = torch.linalg.qr(right.T)  # (k, k)
    except torch.linalg.LinAlgError:
        return torch.tensor(math.nan, dtype=torch.float64)
    return _largest_singular_value(t_left.double() @ t_right.double().T)


def factorized_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


class LossSpikeDetector:
    """Flags a loss spike: a finite loss more than ``threshold`` standard deviations *and* ``min_increase``
    (relative) above the mean of the previous ``window`` losses, after ``warmup`` steps.

    The relative floor keeps a flat, low-noise loss curve from turning tiny wiggles into "spikes". Non-finite
    losses are not spikes (they are skipped steps, counted by the non-finite guard). The detector's state is
    plain numbers so it can be checkpointed with the run.
    """

    def __init__(self, window: int = 50, threshold: float = 4.0, min_increase: float = 0.05, warmup: int = 50):
        if window < 2:
            raise ValueError(f"spike window must be at least 2 steps, got {window}.")
        if threshold <= 0 or min_increase < 0 or warmup < 0:
            raise ValueError("spike threshold must be > 0, min_increase and warmup >= 0.")
        self.window, self.threshold, self.min_increase, self.warmup = window, threshold, min_increase, warmup
        self.history: deque[float] = deque(maxlen=window)
        self.steps = 0
        self.spikes = 0
        self.last_spike_step: int | None = None

    def update(self, loss: float) -> bool:
        """Feed one step's loss; returns whether it is a spike. A spike is not added to the window."""
        if not math.isfinite(loss):
            return False
        self.steps += 1
        is_spike = False
        if self.steps > self.warmup and len(self.history) == self.window:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
            is_spike = loss > mean + self.threshold * std and loss > mean * (1 + self.min_increase)
        if is_spike:
            self.spikes += 1
            self.last_spike_step = self.steps
        else:
            self.history.append(loss)
        return is_spike

    def state_dict(self) -> dict:
        return {
            "window": self.window,
            "threshold": self.threshold,
            "min_increase": self.min_increase,
            "warmup": self.warmup,
            "history": list(self.history),
            "steps": self.steps,
            "spikes": self.spikes,
            "last_spike_step": self.last_spike_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.window, self.threshold = state["window"], state["threshold"]
        self.min_increase, self.warmup = state["min_increase"], state["warmup"]
        self.history = deque(state["history"], maxlen=self.window)
        self.steps, self.spikes, self.last_spike_step = state["steps"], state["spikes"], state["last_spike_step"]


class SpectralDiagnosticsCallback(TrainerCallback):
    """Every ``every`` optimizer steps, logs over all factorized layers (or the dense projections of a dense
    model) the max and mean of σ(up), σ(down), and ‖ΔW‖₂ of that step's update, plus ‖ΔW‖₂ / lr.

    Keys (prefix ``diag/``): ``sigma_up_max``, ``sigma_up_mean``, ``sigma_down_max``, ``sigma_down_mean``,
    ``update_norm_max``, ``update_norm_mean``, ``update_over_lr_max``, ``weight_norm_max`` and
    ``weight_norm_mean`` (‖W‖₂ of the product up·down, or of the dense weight), and ``loss_spikes`` when a spike detector
    is attached (`LowRankTrainer`'s step guard feeds that detector every step's loss, averaged over ranks; with a plain
    `Trainer` this callback feeds it each logged training loss). Without a detector no spike count is logged. With `LowRankTrainer` they are merged into the next regular log line, so they reach
    ``trainer_state.json`` and every ``report_to`` backend; with a plain `Trainer` they are added in ``on_log``,
    and the callback moves itself ahead of the reporting callbacks at ``on_train_begin`` so that they see them too.
    """

    def __init__(self, every: int = 10, spike_detector: LossSpikeDetector | None = None):
        if every < 1:
            raise ValueError(f"diagnostics interval must be >= 1 step, got {every}.")
        self.every = every
        self.spike_detector = spike_detector
        # Whether this callback feeds the detector the logged losses (a plain Trainer); `LowRankTrainer` turns it off
        # for the detector its step guard feeds every step.
        self.feeds_detector = True
        self._snapshot: dict[str, tuple[torch.Tensor, ...]] | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._run_before_reporting_callbacks()

    def _run_before_reporting_callbacks(self) -> None:
        """Move this callback to the front of its Trainer's callback list.

        The Trainer puts the `report_to` callbacks (TensorBoard, W&B, ...) before user callbacks, and each backend
        writes the log dict when its own ``on_log`` runs: values a later callback adds in ``on_log`` reach
        ``trainer_state.json`` but no backend. Callbacks are not handed their `CallbackHandler`, so we take it from
        the caller's frame (`CallbackHandler.call_event`). Moving ourselves from index i to 0 while the handler loops
        over the list leaves every later index in place, so no callback of this event is skipped or repeated.
        """
        frame = inspect.currentframe()
        try:
            caller, handler = frame.f_back, None
            for _ in range(4):  # call_event <- on_train_begin <- Trainer
                if caller is None:
                    break
                if isinstance(caller.f_locals.get("self"), CallbackHandler):
                    handler = caller.f_locals["self"]
                    break
                caller = caller.f_back
        finally:
            del frame
        if handler is None or self not in handler.callbacks:
            warnings.warn(
                "SpectralDiagnosticsCallback could not find its Trainer's callback list: diag/* values reach "
                "trainer_state.json but maybe not the report_to backends. Train with LowRankTrainer to be sure.",
                stacklevel=2,
            )
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)

    def _due(self, state) -> bool:
        return (state.global_step + 1) % self.every == 0  # global_step is incremented after the optimizer step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or not self._due(state):
            return
        model = _unwrap(model)
        snapshot = {
            name: (m.up.weight.detach().clone(), m.down.weight.detach().clone())
            for name, m in factorized_layers(model).items()
        }
        if not snapshot:
            snapshot = {name: (m.weight.detach().clone(),) for name, m in dense_projections(model).items()}
        self._snapshot = snapshot

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._snapshot is None or model is None:
            return
        model = _unwrap(model)
        sigma_up, sigma_down, updates, weights = [], [], [], []
        factorized = factorized_layers(model)
        if factorized:
            for name, module in factorized.items():
                up_before, down_before = self._snapshot[name]
                up, down = module.up.weight.detach(), module.down.weight.detach()
                sigma_up.append(spectral_norm(up).item())
                sigma_down.append(spectral_norm(down).item())
                updates.append(lowrank_difference_spectral_norm(up_before, down_before, up, down).item())
                weights.append(lowrank_product_spectral_norm(up, down).item())
        else:
            for name, module in dense_projections(model).items():
                (before,) = self._snapshot[name]
                # float64: a late-training update is at the edge of float32's precision relative to the weight
                updates.append(spectral_norm(module.weight.detach().double() - before.double()).item())
                weights.append(spectral_norm(module.weight.detach()).item())
        self._snapshot = None
        logs = {
            "diag/update_norm_max": max(updates, default=float("nan")),
            "diag/update_norm_mean": sum(updates) / max(len(updates), 1),
            "diag/weight_norm_max": max(weights, default=float("nan")),
            "diag/weight_norm_mean": sum(weights) / max(len(weights), 1),
        }
        if sigma_up:
            logs.update(
                {
                    "diag/sigma_up_max": max(sigma_up),
                    "diag/sigma_up_mean": sum(sigma_up) / len(sigma_up),
                    "diag/sigma_down_max": max(sigma_down),
                    "diag/sigma_down_mean": sum(sigma_down) / len(sigma_down),
                }
            )
        lr = _matrix_learning_rate(optimizer)
        if lr:
            logs["diag/update_over_lr_max"] = logs["diag/update_norm_max"] / lr
        self._pending.update(logs)

    def pop_logs(self) -> dict[str, float]:
        logs, self._pending = self._pending, {}
        if self.spike_detector is not None and logs:
            logs["diag/loss_spikes"] = self.spike_detector.spikes
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Fallback for a plain Trainer: LowRankTrainer.log has already drained the pending values, and its step guard
        # feeds the detector every step's loss. Here nothing else feeds it, so it gets each logged training loss
        # (the mean over --logging_steps): spikes are detected at logging granularity.
        if logs is None:
            return
        pending = self.pop_logs()
        if self.feeds_detector and self.spike_detector is not None and "loss" in logs:
            self.spike_detector.update(logs["loss"])
            pending["diag/loss_spikes"] = self.spike_detector.spikes
        if pending:
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _matrix_learning_rate(optimizer) -> float | None:
    """The current lr of the groups that update the projection matrices (Spectron or Muon groups, else the first)."""
    if optimizer is None:
        return None
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wrapper
    groups = optimizer.param_groups
    matrices = [g for g in groups if g.get("algorithm") in ("spectron", "muon")]
    return float((matrices or groups)[0]["lr"])
