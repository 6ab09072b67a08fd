"""Spectron's maths: pure functions on tensors, no optimizer, no process groups.

Janson, Oyallon, Belilovsky, "Stabilizing Native Low-Rank LLM Pretraining" (arXiv 2602.12429); the rule
implemented here is the one in ``docs/optimizer.md``. For a factor pair ``W = A Bᵀ`` with ``A = up.weight``
(out, r) and ``Bᵀ = down.weight`` (r, in):

    M ← β·M + (1−β)·G                  one EMA buffer per factor
    O = NS(M)                          Newton–Schulz orthogonalization, singular values ≈ 1
    σ_A, σ_B                           spectral norms by warm-started power iteration
    ρ = lr / (σ_A + σ_B + 1)
    A ← A − ρ·O_A,  B ← B − ρ·O_B

so that ``‖ΔW‖₂ ≲ lr``: **lr is the largest allowed spectral norm of the weight update ΔW per step.**

All spectral math runs in float32 whatever the parameter dtype, and every division is by ``norm + eps``.
Matrices are handled in their *tall* orientation (long × r, :func:`tall_view`): the only products over the long
dimension are the r × r Gram matrix ``XᵀX`` (``gram_fn``) and, in power iteration, sums over rows
(``reduce_fn``), so the sharded step (``sharded.py``) swaps in an all-reduce there and leaves everything else
local. The layers above: ``batched.py`` (the fast path), ``sharded.py`` (FSDP2), ``spectron.py`` (the optimizer).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..configuration_lowrank import long_dim

# Muon's quintic Newton–Schulz coefficients: fast growth of small singular values, ending in a band around 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Seed of the power-iteration start vectors: fixed and drawn from a local generator, so the global RNG is never
# consumed and every run (and every rank) starts from the same vectors.
POWER_ITERATION_SEED = 0


def gram(x: Tensor) -> Tensor:
    """``XᵀX``: (long, r) -> (r, r). The default ``gram_fn``; a sharded version all-reduces this sum."""
    return x.mT @ x


def _identity(x: Tensor) -> Tensor:
    return x


def is_wide(m: Tensor) -> bool:
    """Whether ``m``'s tall view (long × r) is ``m.mT``, by the project's one orientation rule (:func:`long_dim`),
    which every path (reference, batched, sharded) and the FSDP2 placement follow, so that they all see the same
    matrix and a sharded factor is split along the rows of that view."""
    return long_dim(m.shape) == 1


def tall_view(m: Tensor) -> Tensor:
    """``m`` as (long, r), a view."""
    return m.mT if is_wide(m) else m


def _tall(m: Tensor) -> tuple[Tensor, bool]:
    """``m`` in float32 and tall orientation (long, r), and whether it was transposed."""
    wide = is_wide(m)
    m = m.float()
    return (m.mT if wide else m), wide


def _tall_unit(m: Tensor, eps: float, gram_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, bool]:
    """Tall float32 ``X = m / (‖m‖_F + eps)``, its Gram ``XᵀX`` (r, r), and whether ``m`` was transposed.

    ``‖m‖_F² = trace(mᵀm)``, so the normalization needs no reduction beyond the Gram itself.
    """
    x, transposed = _tall(m)
    s = gram_fn(x)  # (r, r)
    scale = 1.0 / (s.diagonal().sum().clamp_min(0).sqrt() + eps)
    return x * scale, s * scale**2, transposed


def newton_schulz(m: Tensor, steps: int = 5, eps: float = 1e-7, gram_fn: Callable[[Tensor], Tensor] = gram) -> Tensor:
    """Approximate the polar factor ``U Vᵀ`` of ``m`` (its singular values pushed to ≈ 1, float32).

    Muon's quintic iteration on the tall ``X`` (long, r), ``X ← a·X + X·(b·S + c·S²)`` with ``S = XᵀX`` (r, r),
    after dividing ``m`` by its Frobenius norm + ``eps``. With 5 steps the output's singular values lie in about
    [0.68, 1.14] (condition numbers up to 100), not at 1: the iteration trades accuracy for speed; much smaller
    singular values of ill-conditioned inputs stay below that band. A zero input returns zeros.
    Returned in ``m``'s orientation.
    """
    a, b, c = NS_COEFFICIENTS
    x, s, transposed = _tall_unit(m, eps, gram_fn)
    for i in range(steps):
        if i:
            s = gram_fn(x)
        x = a * x + x @ (b * s + c * (s @ s))  # (long, r) @ (r, r)
    return x.mT if transposed else x


def spectral_norm(m: Tensor, gram_fn: Callable[[Tensor], Tensor] = gram) -> Tensor:
    """Exact ``‖m‖₂`` (float32 scalar) of a thin matrix: the square root of the largest eigenvalue of its r × r
    Gram matrix. Cheap when min(m.shape) is small; loses relative accuracy only for tiny singular values."""
    x, _ = _tall(m)
    return torch.linalg.eigvalsh(gram_fn(x))[-1].clamp_min(0).sqrt()


def spectral_normalize(m: Tensor, eps: float = 1e-7, gram_fn: Callable[[Tensor], Tensor] = gram) -> Tensor:
    """``m / ‖m‖₂`` (float32): the direction of ``m`` scaled to unit spectral norm, ``‖m‖₂`` computed exactly
    from the r × r Gram. The renormalization-only ablation uses this in place of Newton–Schulz, so the step
    keeps the bound ``‖ΔA‖₂ ≤ ρ`` and only orthogonalization is removed."""
    x, s, transposed = _tall_unit(m, eps, gram_fn)
    x = x / (torch.linalg.eigvalsh(s)[-1].clamp_min(0).sqrt() + eps)
    return x.mT if transposed else x


def power_iteration(
    w: Tensor,
    u: Tensor,
    v: Tensor,
    iters: int = 1,
    eps: float = 1e-7,
    reduce_fn: Callable[[Tensor], Tensor] = _identity,
) -> tuple[Tensor, Tensor, Tensor]:
    """``iters`` rounds of ``v ← wᵀu/‖·‖, u ← wv/‖·‖``; returns ``(σ = uᵀwv, u, v)`` in float32.

    ``w`` is (m, n), ``u`` (m,), ``v`` (n,); warm-start ``u`` from the previous step. Spectron passes each factor
    in its tall orientation (rows = the long dimension), and ``reduce_fn`` is applied to every sum over rows
    (``wᵀu``, ``‖wv‖²``, ``uᵀwv``) so that rows can be sharded. σ never exceeds the true ``‖w‖₂``; it converges
    to it at the rate ``(σ₂/σ₁)²`` per round.
    """
    w = w.float()
    u = u.float()
    v = v.float()
    sigma = w.new_zeros(())
    for _ in range(iters):
        v = reduce_fn(w.mT @ u)  # (n,)
        v = v / (v.norm() + eps)
        wv = w @ v  # (m,)
        norm = reduce_fn(wv @ wv).clamp_min(0).sqrt()
        u = wv / (norm + eps)
        sigma = reduce_fn(u @ wv)  # = uᵀwv without a second matmul
    return sigma, u, v


def init_power_vectors(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic unit start vectors ``(u (long,), v (r,))`` for the tall view of ``weight``, float32.

    Drawn on CPU from a local generator with a fixed seed (never the global RNG), then moved to the weight's
    device: every run and every rank starts identically.
    """
    long, short = max(weight.shape), min(weight.shape)
    generator = torch.Generator().manual_seed(POWER_ITERATION_SEED)
    u = torch.randn(long, generator=generator)
    v = torch.randn(short, generator=generator)
    return (u / u.norm()).to(weight.device), (v / v.norm()).to(weight.device)


def init_spectron_state(weight: Tensor) -> dict[str, Tensor]:
    """The state of one factor, tensors only: float32 momentum, power vectors, last σ, and a CPU step count."""
    u, v = init_power_vectors(weight)
    return {
        "step": torch.tensor(0.0),
        "momentum_buffer": torch.zeros_like(weight, dtype=torch.float32, memory_format=torch.preserve_format),
        "u": u,
        "v": v,
        "sigma": torch.zeros((), device=weight.device),
    }


class PairView(NamedTuple):
    """One factor pair as a Spectron step sees it: the arguments of :func:`spectron_pair_update`.

    ``up``, ``down`` and the state tensors are changed in place; for a sharded pair they are the local shards along
    the long dimension and ``gram_fn``/``reduce_fn`` all-reduce over the shards (``distributed`` is then True). A
    missing gradient is ``None`` (the step uses zeros).
    """

    up: Tensor
    down: Tensor
    grad_up: Tensor | None
    grad_down: Tensor | None
    state_up: dict[str, Tensor]
    state_down: dict[str, Tensor]
    gram_fn: Callable[[Tensor], Tensor] = gram
    reduce_fn: Callable[[Tensor], Tensor] = _identity
    distributed: bool = False


@torch.no_grad()
def spectron_pair_update(
    up: Tensor,
    down: Tensor,
    grad_up: Tensor,
    grad_down: Tensor,
    state_up: dict[str, Tensor],
    state_down: dict[str, Tensor],
    *,
    lr: float,
    momentum: float = 0.95,
    ns_steps: int = 5,
    power_iters: int = 1,
    weight_decay: float = 0.0,
    orthogonalize: bool = True,
    renormalize: bool = True,
    eps: float = 1e-7,
    gram_fn: Callable[[Tensor], Tensor] = gram,
    reduce_fn: Callable[[Tensor], Tensor] = _identity,
) -> Tensor:
    """One Spectron step on the pair ``W = up @ down``, in place; returns the step size ``ρ``.

    ``up`` is (out, r), ``down`` (r, in). ``state_*`` hold ``momentum_buffer``, ``u``, ``v`` and ``sigma``
    (see :func:`init_spectron_state`), updated in place. In order:

    1. decoupled weight decay on each factor, ``p ← p·(1 − lr·weight_decay)`` (before the update, as AdamW);
    2. ``M ← β·M + (1−β)·G`` per factor (float32);
    3. direction ``O = NS(M)`` if ``orthogonalize`` else ``M/‖M‖₂`` (exact, unit spectral norm);
    4. ``σ`` of each (decayed) factor by ``power_iters`` warm-started power-iteration rounds;
    5. ``ρ = lr/(σ_up + σ_down + 1)`` if ``renormalize`` else ``ρ = lr``;
    6. ``p ← p − ρ·O``.
    """
    for param, grad, state in ((up, grad_up, state_up), (down, grad_down, state_down)):
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        state["momentum_buffer"].lerp_(grad.float(), 1 - momentum)
        sigma, u, v = power_iteration(tall_view(param), state["u"], state["v"], power_iters, eps, reduce_fn)
        state["u"].copy_(u)
        state["v"].copy_(v)
        state["sigma"].copy_(sigma)
    rho = lr / (state_up["sigma"] + state_down["sigma"] + 1) if renormalize else torch.tensor(float(lr))
    for param, state in ((up, state_up), (down, state_down)):
        buffer = state["momentum_buffer"]
        direction = (
            newton_schulz(buffer, ns_steps, eps, gram_fn) if orthogonalize else spectral_normalize(buffer, eps, gram_fn)
        )
        param.sub_((rho.to(direction.device) * direction).to(param.dtype))
    return rho


def init_muon_state(weight: Tensor) -> dict[str, Tensor]:
    """The state of one dense Muon matrix, tensors only: a float32 momentum and a CPU step count."""
    return {
        "step": torch.tensor(0.0),
        "momentum_buffer": torch.zeros_like(weight, dtype=torch.float32, memory_format=torch.preserve_format),
    }


@torch.no_grad()
def muon_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    momentum: float = 0.95,
    ns_steps: int = 5,
    weight_decay: float = 0.0,
    eps: float = 1e-7,
) -> None:
    """One Muon step on a dense matrix ``param`` (out, in), in place: the factorized "orthogonalization only" step
    applied to the whole matrix, so both have the same units, ``‖ΔW‖₂ ≈ lr``:

    1. decoupled weight decay ``p ← p·(1 − lr·weight_decay)``;
    2. ``M ← β·M + (1−β)·G`` (float32, no Nesterov);
    3. ``p ← p − lr·NS(M)`` (Muon's quintic Newton–Schulz, ``ns_steps`` rounds; no shape scaling of lr).
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    state["momentum_buffer"].lerp_(grad.float(), 1 - momentum)
    direction = newton_schulz(state["momentum_buffer"], ns_steps, eps)
    param.sub_((lr * direction).to(param.dtype))
    state["step"] += 1


@torch.no_grad()
def rebalance_pair(
    up: Tensor,
    down: Tensor,
    state_up: dict[str, Tensor],
    state_down: dict[str, Tensor],
    *,
    power_iters: int = 1,
    eps: float = 1e-7,
    reduce_fn: Callable[[Tensor], Tensor] = _identity,
) -> Tensor:
    """Rescale ``up ← c·up``, ``down ← down/c`` with ``c = sqrt(σ_down/σ_up)``: equal spectral norms, same product.

    The σ's are refreshed by ``power_iters`` warm-started rounds on the current factors. Momentum buffers are
    rescaled the way gradients transform (``G_up = G_W downᵀ`` shrinks by ``c`` when ``down`` does, ``G_down``
    grows by ``c``): ``M_up ← M_up/c``, ``M_down ← c·M_down``, so the EMA keeps mixing gradients of one scale.
    A factor with ``σ ≤ eps`` is left alone (``c = 1``). Returns ``c``.
    """
    for param, state in ((up, state_up), (down, state_down)):
        sigma, u, v = power_iteration(tall_view(param), state["u"], state["v"], power_iters, eps, reduce_fn)
        state["u"].copy_(u)
        state["v"].copy_(v)
        state["sigma"].copy_(sigma)
    sigma_up, sigma_down = state_up["sigma"], state_down["sigma"]
    healthy = torch.minimum(sigma_up, sigma_down) > eps
    c = torch.where(healthy, ((sigma_down + eps) / (sigma_up + eps)).sqrt(), torch.ones_like(sigma_up))
    up.mul_(c.to(up.dtype))
    down.div_(c.to(down.dtype))
    state_up["momentum_buffer"].div_(c)
    state_down["momentum_buffer"].mul_(c)
    state_up["sigma"].mul_(c)
    state_down["sigma"].div_(c)
    return c


@torch.no_grad()
def adamw_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One decoupled AdamW step in place, the same arithmetic as ``torch.optim.AdamW`` (single-tensor path).

    ``state`` holds ``step`` (CPU float32 scalar), ``exp_avg`` and ``exp_avg_sq`` (the parameter's dtype).
    """
    beta1, beta2 = betas
    state["step"] += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = state["step"].item()
    step_size = lr / (1 - beta1**step)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(state["exp_avg"], denom, value=-step_size)


def init_adamw_state(param: Tensor) -> dict[str, Tensor]:
    """The state of one AdamW parameter, as ``torch.optim.AdamW`` keeps it: a CPU step count and two moments."""
    return {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }
