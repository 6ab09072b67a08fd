"""Every hyperparameter of the optimizer, declared once with its unit, default and validation.

A ``torch.optim.Optimizer`` keeps its hyperparameters in plain param-group dicts (LR schedulers write ``lr`` there),
so :class:`~hf_lowrank.optim.Spectron` stores dicts and reads them back through these records: the constructor,
``add_param_group`` and every step validate with the same rules, and the update functions get their keyword
arguments from :meth:`SpectronHyperparameters.update_options`, not from a list repeated at each call site.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and value >= minimum


class _Record:
    """Shared constructor of the records below from a param-group dict."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_group(cls, group: Mapping, where: str):
        """The record of the keys of ``group`` that name hyperparameters (others, like ``params``, are ignored);
        a bad value raises ``ValueError`` prefixed with ``where`` (the group's name)."""
        try:
            return cls(**{name: group[name] for name in cls.names() if name in group})
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}


@dataclass(frozen=True)
class SpectronHyperparameters(_Record):
    """The hyperparameters of one Spectron factor pair (a param group, or the optimizer's defaults).

    Attributes:
        lr: **the largest allowed spectral norm of the weight update ΔW = Δ(up @ down) per step** (typical values
            0.02-0.1; not comparable to an AdamW learning rate). The bound holds approximately: Newton–Schulz leaves
            singular values in about [0.68, 1.14] and power iteration slightly underestimates σ.
        momentum: β of the EMA momentum ``M ← β·M + (1−β)·G``, in [0, 1) (0.95 is the paper's).
        ns_steps: Newton–Schulz iterations (5 is Muon's; 0 gives the Frobenius-normalized momentum).
        power_iters: power-iteration rounds per step, warm-started from the previous step's vectors.
        first_power_iters: rounds on a pair's first step (from a fixed start vector), so that σ, and with it the
            bound, is right from step one; the first step runs ``max(first_power_iters, power_iters)``.
        weight_decay: decoupled, per factor: ``p ← p·(1 − lr·weight_decay)`` before the update. With lr in spectral
            units, ``lr·weight_decay`` is the fraction each factor shrinks per step.
        orthogonalize: direction ``NS(M)`` (True) or ``M/‖M‖₂`` with the exact spectral norm (False).
        renormalize: step ``ρ = lr/(σ_up + σ_down + 1)`` (True) or ``ρ = lr`` (False).
            ``orthogonalize=False`` gives "renormalization only" (‖ΔA‖₂ ≤ ρ still holds);
            ``renormalize=False`` gives "orthogonalization only", Muon per factor with ‖ΔA‖₂ ≈ lr;
            both False gives momentum normalized to unit spectral norm with step ``lr``.
        rebalance_every: every k > 0 steps, rescale each pair so both factors have the same spectral norm (the
            product is unchanged, the momenta are rescaled like gradients); 0 never.
        eps: added to every norm that divides (Newton–Schulz, power iteration, renormalization).
    """

    lr: float
    momentum: float = 0.95
    ns_steps: int = 5
    power_iters: int = 1
    first_power_iters: int = 10
    weight_decay: float = 0.0
    orthogonalize: bool = True
    renormalize: bool = True
    rebalance_every: int = 0
    eps: float = 1e-7

    def __post_init__(self):
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0 (the spectral-norm bound of each update), got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) (0.95 is the paper's), got {self.momentum}.")
        if not _is_count(self.ns_steps, 0):
            raise ValueError(f"ns_steps must be an integer >= 0 (5 is Muon's), got {self.ns_steps!r}.")
        for name in ("power_iters", "first_power_iters"):
            if not _is_count(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if not _is_count(self.rebalance_every, 0):
            raise ValueError(f"rebalance_every must be an integer >= 0 (0 disables), got {self.rebalance_every!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 (it guards divisions by zero norms), got {self.eps}.")

    def update_options(self, first: bool) -> dict:
        """Keyword arguments of ``spectron_pair_update``/``spectron_update_batched`` for a step (``first``: the
        pair's first step, which runs ``first_power_iters`` rounds of power iteration)."""
        return dict(
            lr=self.lr,
            momentum=self.momentum,
            ns_steps=self.ns_steps,
            power_iters=max(self.first_power_iters, self.power_iters) if first else self.power_iters,
            weight_decay=self.weight_decay,
            orthogonalize=self.orthogonalize,
            renormalize=self.renormalize,
            eps=self.eps,
        )


@dataclass(frozen=True)
class AdamWHyperparameters(_Record):
    """The hyperparameters of an AdamW group (embeddings, LM head, norms, biases): ``torch.optim.AdamW``'s.

    Attributes:
        lr: the AdamW step size (~1e-3), in the units of the parameter; no default, since Spectron's ``lr`` is a
            spectral-norm bound and not a sensible value here.
        betas: EMA coefficients of the first and second moments, each in [0, 1).
        eps: added to the root of the second moment.
        weight_decay: decoupled, ``p ← p·(1 − lr·weight_decay)``.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}.")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")


# Keys torch's add_param_group copies from Spectron's defaults into every group, and that mean nothing to AdamW.
SPECTRON_ONLY_KEYS = tuple(name for name in SpectronHyperparameters.names() if name not in AdamWHyperparameters.names())

# The AdamW defaults every entry point reads (build_optimizer, Spectron's AdamW groups, `hf-lowrank pretrain`'s
# --adam_beta1/--adam_beta2/--adam_epsilon): declared once, here. The lr is a placeholder; it has no default.
ADAMW_DEFAULTS = AdamWHyperparameters(lr=0.0)
