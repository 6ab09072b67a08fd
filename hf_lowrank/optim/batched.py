"""The fast path of Spectron: the step of :func:`~hf_lowrank.optim.functional.spectron_pair_update`, run on all
factor pairs of a model at once. ``tests/test_spectron_fast.py`` ties the two together.

The reference steps one pair at a time and runs Newton–Schulz on the tall (long × r) momentum, five rounds of
``X ← aX + X(bS + cS²)``: 20·long·r² + 10·r³ flops per factor. Here:

* **Newton–Schulz in Gram form.** Every iterate is ``X_k = X₀ P_k`` with ``P_k`` a polynomial in
  ``S₀ = X₀ᵀX₀`` (r × r): ``Q_k = aI + bS_k + cS_k²``, ``P_{k+1} = P_k Q_k``, ``S_{k+1} = Q_k S_k Q_k``, all in
  r × r. After ``GRAM_RESTART_AFTER`` rounds the iterate is formed once explicitly (float32 accuracy, see there),
  so the long dimension is touched four times instead of ten: 8·long·r² + 28·r³ flops per factor for 5 rounds,
  against the reference's 20·long·r² + 10·r³: 1.5× fewer for a square layer at rank ratio 0.25 (long = 4r),
  2× fewer for a 2.75× MLP (long = 11r).
* **The step folded into the product.** ``p ← p − ρ·NS(M)`` is ``p ← p + M·(−ρ·P)``: one ``addmm_`` into the
  parameter, no long × r temporary.
* **Batching.** The r × r iterations of all factors of one rank run as batched matmuls; the elementwise parts
  (weight decay, momentum) as ``torch._foreach_*`` over all factors.

Factors are never copied into their tall orientation: a wide factor (r × long) uses ``M Mᵀ`` and ``Pᵀ M``, the same numbers as
the reference's tall view. The per-factor state (``momentum_buffer``, ``u``, ``v``, ``sigma``) is the reference's,
so checkpoints do not depend on the path. All spectral math is float32 whatever the parameter dtype.
"""

from collections import defaultdict

import torch
from torch import Tensor

from .functional import NS_COEFFICIENTS, is_wide, power_iteration, tall_view

# Newton–Schulz rounds done in Gram form before the iterate is formed explicitly and its Gram recomputed. Over five
# rounds in Gram form P grows to ~a⁵ ≈ 490 in the directions of small singular values and float32 rounding of P
# reaches 1e-4 of the result (cond(M) ≥ 100); forming X₃ = X₀P₃ and restarting keeps the result within 5e-6 of
# a float64 Newton–Schulz, as close as the reference (tests/test_spectron_fast.py), for two more long × r² products.
GRAM_RESTART_AFTER = 3

# Factors of one rank are processed in chunks of at most this many momentum elements (32 MiB of float32), which
# bounds the step's temporaries (explicit iterates, Grams) to a few times that instead of a multiple of all the
# factors: unchunked, they set the peak memory of training (+30% of the factorized model's peak at width 2048).
# bmm batches of a chunk are still large enough to run at full speed.
CHUNK_ELEMENTS = 2**23


def _gram(m: Tensor, out: Tensor) -> Tensor:
    """``XᵀX`` (r, r) of the tall view X of ``m``, written into ``out``."""
    return torch.mm(m, m.mT, out=out) if is_wide(m) else torch.mm(m.mT, m, out=out)


def gram_polynomials(grams: Tensor, steps: int = 5) -> Tensor:
    """``P`` (n, r, r) with ``NS(X) = X P`` for tall float32 ``X`` of unit Frobenius norm and Gram ``XᵀX = grams``.

    ``steps`` rounds of Muon's quintic iteration carried out on the r × r Gram (see the module docstring).
    """
    a, b, c = NS_COEFFICIENTS
    s = grams
    polynomial = None
    for step in range(steps):
        q = torch.baddbmm(s, s, s, beta=b, alpha=c)  # b·S + c·S²
        q.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = aI + bS + cS²
        polynomial = q if polynomial is None else torch.bmm(polynomial, q)
        if step < steps - 1:
            s = torch.bmm(q, torch.bmm(s, q))  # S ← Q S Q: the Gram of X Q
    if polynomial is None:
        polynomial = torch.eye(grams.shape[-1], device=grams.device).expand_as(grams).clone()
    return polynomial


def _grams(matrices: list[Tensor]) -> Tensor:
    """Grams (n, r, r) of the tall views of float32 ``matrices`` of one rank."""
    rank = min(matrices[0].shape)
    grams = matrices[0].new_empty(len(matrices), rank, rank)
    for m, out in zip(matrices, grams.unbind(0)):
        _gram(m, out)
    return grams


def _times(m: Tensor, p: Tensor) -> Tensor:
    """``X P`` for the tall view ``X`` of ``m``, in ``m``'s orientation."""
    return p.mT @ m if is_wide(m) else m @ p


def newton_schulz_factors(momenta: list[Tensor], steps: int = 5, eps: float = 1e-7) -> tuple[list[Tensor], Tensor]:
    """``(bases, polynomials)`` with ``NS(momenta[i]) = bases[i] · polynomials[i]`` (tall view, r × r on the right).

    ``momenta``: float32 matrices of one rank, any orientation. Rounds run in Gram form in stages of at most
    ``GRAM_RESTART_AFTER``; between stages the iterate is formed explicitly and its Gram recomputed, so ``bases``
    are the momenta themselves for ``steps <= GRAM_RESTART_AFTER`` and the last explicit iterate otherwise. The
    normalization ``1/(‖M‖_F + eps)`` is folded into the first stage's polynomials; the Gram is taken of the raw
    momentum and scaled afterwards, as the reference does.
    """
    grams = _grams(momenta)
    scale = 1.0 / (grams.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt() + eps)  # ‖M‖_F² = tr(MᵀM)
    rounds = min(steps, GRAM_RESTART_AFTER)
    polynomials = gram_polynomials(grams * (scale * scale)[:, None, None], rounds) * scale[:, None, None]
    bases, remaining = momenta, steps - rounds
    while remaining:
        bases = [_times(m, p) for m, p in zip(bases, polynomials.unbind(0))]
        rounds = min(remaining, GRAM_RESTART_AFTER)
        polynomials = gram_polynomials(_grams(bases), rounds)
        remaining -= rounds
    return bases, polynomials


def newton_schulz_many(momenta: list[Tensor], steps: int = 5, eps: float = 1e-7) -> list[Tensor]:
    """:func:`~hf_lowrank.optim.functional.newton_schulz` of each float32 matrix of ``momenta`` (all of one rank, any
    orientation), in Gram form and batched. Equal to the reference up to float32 rounding."""
    bases, polynomials = newton_schulz_factors(momenta, steps, eps)
    return [_times(m, p) for m, p in zip(bases, polynomials.unbind(0))]


def _chunks(momenta: list[Tensor]) -> list[list[int]]:
    """Indices of ``momenta`` grouped by rank and device, each group cut into chunks of ``CHUNK_ELEMENTS``."""
    by_rank: dict[tuple, list[int]] = defaultdict(list)
    for index, m in enumerate(momenta):
        by_rank[(min(m.shape), m.device)].append(index)
    chunks = []
    for members in by_rank.values():
        chunk, size = [], 0
        for index in members:
            if chunk and size + momenta[index].numel() > CHUNK_ELEMENTS:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(index)
            size += momenta[index].numel()
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def spectron_update_batched(
    ups: list[Tensor],
    downs: list[Tensor],
    grads_up: list[Tensor],
    grads_down: list[Tensor],
    states_up: list[dict[str, Tensor]],
    states_down: list[dict[str, Tensor]],
    *,
    lr: float,
    momentum: float = 0.95,
    ns_steps: int = 5,
    power_iters: int = 1,
    weight_decay: float = 0.0,
    orthogonalize: bool = True,
    renormalize: bool = True,
    eps: float = 1e-7,
) -> Tensor:
    """One Spectron step on every pair ``(ups[i], downs[i])``, in place; returns the step sizes ``ρ`` (n,).

    The arithmetic and order of ``spectron_pair_update`` applied to each pair with these hyperparameters:
    decoupled weight decay, EMA momentum, warm-started power iteration on the decayed factors,
    ``ρ = lr/(σ_up + σ_down + 1)``, then ``p ← p − ρ·NS(M)`` (or ``M/‖M‖₂`` without ``orthogonalize``).
    """
    n_pairs = len(ups)
    params = [*ups, *downs]
    grads = [g if g.dtype == torch.float32 else g.float() for g in (*grads_up, *grads_down)]
    states = [*states_up, *states_down]
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    momenta = [state["momentum_buffer"] for state in states]
    torch._foreach_lerp_(momenta, grads, 1 - momentum)

    # σ of each (decayed) factor; matrix-vector products on the factor itself, so batching would only add copies.
    for param, state in zip(params, states):
        sigma, u, v = power_iteration(tall_view(param), state["u"], state["v"], power_iters, eps)
        state["u"].copy_(u)
        state["v"].copy_(v)
        state["sigma"].copy_(sigma)
    sigmas = torch.stack([state["sigma"] for state in states])  # (2n,)
    if renormalize:
        rho = lr / (sigmas[:n_pairs] + sigmas[n_pairs:] + 1)  # (n,)
    else:
        rho = torch.full((n_pairs,), float(lr), device=sigmas.device)
    rho_per_factor = torch.cat([rho, rho])

    for members in _chunks(momenta):
        group_momenta = [momenta[i] for i in members]
        if not orthogonalize:  # M/‖M‖₂ = X₀/σ_max(X₀), σ_max² the top eigenvalue of the normalized Gram
            grams = _grams(group_momenta)
            scale = 1.0 / (grams.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt() + eps)
            top = torch.linalg.eigvalsh(grams * (scale * scale)[:, None, None])[..., -1].clamp_min(0).sqrt()
            coefficient = -rho_per_factor[members] * scale / (top + eps)
            for i, step in zip(members, torch._foreach_mul(group_momenta, list(coefficient.unbind(0)))):
                params[i].add_(step.to(params[i].dtype))
            continue
        # p ← p − ρ·NS(M) = p + B·(−ρ·P): the step size rides on the r × r side, one addmm_ into the parameter.
        bases, polynomials = newton_schulz_factors(group_momenta, ns_steps, eps)
        polynomials = polynomials * (-rho_per_factor[members])[:, None, None]
        for i, base, polynomial in zip(members, bases, polynomials.unbind(0)):
            param = params[i]
            if param.dtype == torch.float32:
                param.addmm_(polynomial.mT, base) if is_wide(base) else param.addmm_(base, polynomial)
            else:  # the step is formed in float32 and rounded once, as the reference does
                param.add_(_times(base, polynomial).to(param.dtype))
    return rho
