"""Spectron: orthogonalized momentum per factor with a step renormalized by the factors' spectral norms.

Janson, Oyallon, Belilovsky, "Stabilizing Native Low-Rank LLM Pretraining" (arXiv 2602.12429); the rule
implemented here is the one in ``docs/optimizer.md``. For a factor pair ``W = A Bᵀ`` with ``A = up.weight``
(out, r) and ``Bᵀ = down.weight`` (r, in):

    M ← β·M + (1−β)·G                  one EMA buffer per factor
    O = NS(M)                          Newton–Schulz orthogonalization, singular values ≈ 1
    σ_A, σ_B                           spectral norms by warm-started power iteration
    ρ = lr / (σ_A + σ_B + 1)
    A ← A − ρ·O_A,  B ← B − ρ·O_B

so that ``‖ΔW‖₂ ≲ lr``: **lr is the largest allowed spectral norm of the weight update ΔW per step.**

The math lives in pure functions; :class:`Spectron` only holds state and loops over groups. All spectral math
runs in float32 whatever the parameter dtype, and every division is by ``norm + eps``. Matrices are handled
in their *tall* orientation (long × r): the only products over the long dimension are the r × r Gram matrix
``XᵀX`` (``gram_fn``) and, in power iteration, sums over rows (``reduce_fn``), so a sharded implementation can
swap in an all-reduce there and leave everything else local.
"""

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

# Muon's quintic Newton–Schulz coefficients: fast growth of small singular values, ending in a band around 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Seed of the power-iteration start vectors: fixed and drawn from a local generator, so the global RNG is never
# consumed and every run (and every rank) starts from the same vectors.
POWER_ITERATION_SEED = 0

_SPECTRON_ONLY_KEYS = (
    "momentum",
    "ns_steps",
    "power_iters",
    "first_power_iters",
    "orthogonalize",
    "renormalize",
    "rebalance_every",
)


def gram(x: Tensor) -> Tensor:
    """``XᵀX``: (long, r) -> (r, r). The default ``gram_fn``; a sharded version all-reduces this sum."""
    return x.mT @ x


def _identity(x: Tensor) -> Tensor:
    return x


def _tall(m: Tensor) -> tuple[Tensor, bool]:
    """``m`` in float32 and tall orientation (long, r), and whether it was transposed."""
    m = m.float()
    return (m.mT, True) if m.shape[0] < m.shape[1] else (m, False)


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


def _tall_view(weight: Tensor) -> Tensor:
    return weight.mT if weight.shape[0] < weight.shape[1] else weight


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
        sigma, u, v = power_iteration(_tall_view(param), state["u"], state["v"], power_iters, eps, reduce_fn)
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
        sigma, u, v = power_iteration(_tall_view(param), state["u"], state["v"], power_iters, eps, reduce_fn)
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
    return {
        "step": torch.tensor(0.0),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


class Spectron(torch.optim.Optimizer):
    r"""Spectron for factor pairs, plus AdamW for everything else, in one optimizer.

    **Units: ``lr`` is the largest allowed spectral norm of the weight update ΔW = Δ(up @ down) per step**
    (typical values 0.02–0.1; it is not comparable to an AdamW learning rate). The bound holds approximately:
    Newton–Schulz leaves singular values in about [0.68, 1.14] and power iteration slightly underestimates σ.

    Args:
        params: an iterable of ``(up.weight, down.weight)`` tuples, or of param-group dicts. A Spectron group
            holds exactly one pair, ``"params": [up.weight, down.weight]`` with shapes (out, r) and (r, in),
            plus optional per-group values of the hyperparameters below. A group with ``"algorithm": "adamw"``
            holds any parameters (embeddings, LM head, norms, biases) and gets decoupled AdamW; it must set its
            own ``lr``; ``betas`` and ``eps`` default to ``adamw_betas`` and ``adamw_eps``, ``weight_decay`` to 0
            (the constructor's ``weight_decay`` is in Spectron's units). Use
            :func:`hf_lowrank.optim.build_optimizer` to route a model's parameters.
        lr: spectral-norm bound of ΔW per step (see above).
        momentum: β of the EMA momentum ``M ← β·M + (1−β)·G``, in [0, 1).
        ns_steps: Newton–Schulz iterations (0 gives the Frobenius-normalized momentum).
        power_iters: power-iteration rounds per step, warm-started from the previous step's vectors.
        first_power_iters: rounds on a pair's first step (from a fixed start vector), so that σ, and with it the
            bound, is right from step one; the first step uses ``max(first_power_iters, power_iters)``.
        weight_decay: decoupled, per factor: ``p ← p·(1 − lr·weight_decay)`` before the update. With lr in
            spectral units, ``lr·weight_decay`` is the fraction each factor shrinks per step.
        orthogonalize: direction ``NS(M)`` (True) or ``M/‖M‖₂`` with the exact spectral norm (False).
        renormalize: step ``ρ = lr/(σ_up + σ_down + 1)`` (True) or ``ρ = lr`` (False).
            ``orthogonalize=False`` gives "renormalization only" (‖ΔA‖₂ ≤ ρ still holds);
            ``renormalize=False`` gives "orthogonalization only", Muon per factor with ‖ΔA‖₂ ≈ lr;
            both False gives momentum normalized to unit spectral norm with step ``lr``.
        rebalance_every: every k > 0 steps, rescale each pair so both factors have the same spectral norm
            (the product is unchanged, the momenta are rescaled like gradients); 0 (default) never.
        eps: added to every norm that divides (Newton–Schulz, power iteration, renormalization).
        adamw_betas, adamw_eps: defaults of the AdamW groups.
        batched: the fast path (default): all pairs that share hyperparameters in one step, Newton–Schulz in its
            r × r Gram form batched over factors of one rank (:mod:`hf_lowrank.optim.batched`), and AdamW groups
            on CPU through torch's fused kernel. ``False`` runs the reference ``spectron_pair_update`` pair by pair
            and ``adamw_update``. Same results up to float32 rounding (tests/test_spectron_fast.py), same state;
            1.8-2.1x faster on CPU (docs/benchmarks.md).

    State (tensors only, loadable with ``torch.load(weights_only=True)``): per factor ``momentum_buffer``
    (float32), power-iteration vectors ``u`` (long,) and ``v`` (r,), the last ``sigma`` and ``step`` (a CPU
    tensor); per AdamW parameter ``step``, ``exp_avg``, ``exp_avg_sq``.

    Groups whose parameters are DTensors (FSDP2) step on local shards with the Grams and power-iteration sums
    all-reduced: see :mod:`hf_lowrank.optim.distributed`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.95,
        ns_steps: int = 5,
        power_iters: int = 1,
        first_power_iters: int = 10,
        weight_decay: float = 0.0,
        orthogonalize: bool = True,
        renormalize: bool = True,
        rebalance_every: int = 0,
        eps: float = 1e-7,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        batched: bool = True,
    ):
        self.batched = batched
        self._adamw_defaults = {"betas": tuple(adamw_betas), "eps": adamw_eps, "weight_decay": 0.0}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            ns_steps=ns_steps,
            power_iters=power_iters,
            first_power_iters=first_power_iters,
            weight_decay=weight_decay,
            orthogonalize=orthogonalize,
            renormalize=renormalize,
            rebalance_every=rebalance_every,
            eps=eps,
        )
        _validate_spectron_hyperparameters(defaults, where="Spectron")
        groups = []
        for item in params:
            if isinstance(item, dict):
                groups.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
                groups.append({"params": list(item)})
            else:
                raise ValueError(
                    "Spectron takes (up.weight, down.weight) pairs or param-group dicts, got "
                    f"{type(item).__name__}. Use hf_lowrank.optim.build_optimizer(model, 'spectron', lr) to route "
                    "a model's parameters."
                )
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        algorithm = group.setdefault("algorithm", "spectron")
        if algorithm == "spectron":
            _validate_pair(group)
            _validate_spectron_hyperparameters({**self.defaults, **group}, where=f"group {group.get('name', '')!r}")
        elif algorithm == "adamw":
            if "lr" not in group:
                raise ValueError(
                    f"AdamW group {group.get('name', '')!r} must set its own 'lr': Spectron's lr is a spectral-norm "
                    "bound (~0.02-0.1), not an AdamW step size (~1e-3)."
                )
            for key, value in self._adamw_defaults.items():
                group.setdefault(key, value)
            _validate_adamw_hyperparameters(group)
        else:
            raise ValueError(f"Unknown 'algorithm' {algorithm!r} in a Spectron param group; use 'spectron' or 'adamw'.")
        super().add_param_group(group)
        if algorithm == "adamw":  # torch filled in Spectron's defaults, which mean nothing here
            for key in _SPECTRON_ONLY_KEYS:
                group.pop(key, None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spectron_groups = []
        for group in self.param_groups:
            if _holds_dtensor(group):  # FSDP2: the same math on local shards (optim/distributed.py)
                from .distributed import dtensor_group_step

                dtensor_group_step(self, group)
            elif group["algorithm"] == "adamw":
                self._adamw_step(group)
            else:
                spectron_groups.append(group)
        self._spectron_steps(spectron_groups)
        return loss

    def _spectron_steps(self, groups: list[dict]) -> None:
        """Step the pairs of ``groups``: one by one with ``spectron_pair_update``, or, when ``batched``, all pairs
        with the same hyperparameters in one ``spectron_update_batched`` call."""
        from .batched import spectron_update_batched

        stepped, batches = [], defaultdict(list)
        for group in groups:
            up, down = group["params"]
            if up.grad is None and down.grad is None:
                continue
            for param in (up, down):
                if not self.state[param]:
                    self.state[param].update(init_spectron_state(param))
            state_up, state_down = self.state[up], self.state[down]
            first = state_up["step"].item() == 0
            pair = (
                up,
                down,
                up.grad if up.grad is not None else torch.zeros_like(up),
                down.grad if down.grad is not None else torch.zeros_like(down),
                state_up,
                state_down,
            )
            options = dict(
                lr=group["lr"],
                momentum=group["momentum"],
                ns_steps=group["ns_steps"],
                power_iters=max(group["first_power_iters"], group["power_iters"]) if first else group["power_iters"],
                weight_decay=group["weight_decay"],
                orthogonalize=group["orthogonalize"],
                renormalize=group["renormalize"],
                eps=group["eps"],
            )
            if self.batched:
                batches[tuple(options.items())].append(pair)
            else:
                spectron_pair_update(*pair, **options)
            stepped.append(group)
        for options, pairs in batches.items():
            spectron_update_batched(*(list(column) for column in zip(*pairs)), **dict(options))
        for group in stepped:
            up, down = group["params"]
            state_up, state_down = self.state[up], self.state[down]
            state_up["step"] += 1
            state_down["step"] += 1
            every = group["rebalance_every"]
            if every and int(state_up["step"].item()) % every == 0:
                rebalance_pair(up, down, state_up, state_down, power_iters=group["power_iters"], eps=group["eps"])

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for param in params:
            if not self.state[param]:
                self.state[param].update(init_adamw_state(param))
        if self.batched and params and all(p.device.type == "cpu" for p in params):
            # torch's fused CPU kernel: one pass per tensor instead of adamw_update's five, and no temporaries
            # (10x faster on an embedding); the arithmetic of adamw_update up to float32 rounding.
            states = [self.state[p] for p in params]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
            return
        for param in params:
            adamw_update(
                param,
                param.grad,
                self.state[param],
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to its parameter's dtype; Spectron keeps float32 momenta and vectors for
        # bf16 factors, so restore the saved dtypes or a resumed run would not match an uninterrupted one (R5).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and value.dtype != self.state[param][key].dtype:
                    self.state[param][key] = value.to(device=self.state[param][key].device)


def _holds_dtensor(group: dict) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported, and importing it costs a second.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in group["params"])


def _validate_pair(group: dict) -> None:
    name = group.get("name", "")
    params = group["params"]
    if len(params) != 2:
        raise ValueError(
            f"Spectron group {name!r} holds {len(params)} tensors; a Spectron group holds exactly one factor pair, "
            "'params': [up.weight, down.weight]. Put other parameters in a group with 'algorithm': 'adamw'."
        )
    up, down = params
    if up.ndim != 2 or down.ndim != 2:
        raise ValueError(
            f"Spectron group {name!r}: factors must be 2-D, got shapes {tuple(up.shape)} and {tuple(down.shape)}. "
            "Put vectors (norms, biases) in an 'adamw' group."
        )
    out_features, rank = up.shape
    if down.shape[0] != rank or rank > min(out_features, down.shape[1]):
        raise ValueError(
            f"Spectron group {name!r}: shapes {tuple(up.shape)} and {tuple(down.shape)} are not a factor pair "
            "(out, r) and (r, in) with r <= min(out, in); pass [up.weight, down.weight] in that order."
        )


def _validate_spectron_hyperparameters(h: dict, where: str) -> None:
    if not h["lr"] >= 0:
        raise ValueError(f"{where}: lr must be >= 0 (the spectral-norm bound of each update), got {h['lr']}.")
    if not 0 <= h["momentum"] < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1) (0.95 is the paper's), got {h['momentum']}.")
    if not (isinstance(h["ns_steps"], int) and h["ns_steps"] >= 0):
        raise ValueError(f"{where}: ns_steps must be an integer >= 0 (5 is Muon's), got {h['ns_steps']!r}.")
    for key in ("power_iters", "first_power_iters"):
        if not (isinstance(h[key], int) and h[key] >= 1):
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {h[key]!r}.")
    if not h["weight_decay"] >= 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {h['weight_decay']}.")
    if not (isinstance(h["rebalance_every"], int) and h["rebalance_every"] >= 0):
        raise ValueError(
            f"{where}: rebalance_every must be an integer >= 0 (0 disables), got {h['rebalance_every']!r}."
        )
    if not h["eps"] > 0:
        raise ValueError(f"{where}: eps must be > 0 (it guards divisions by zero norms), got {h['eps']}.")


def _validate_adamw_hyperparameters(group: dict) -> None:
    where = f"AdamW group {group.get('name', '')!r}"
    if not group["lr"] >= 0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}.")
    betas = group["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas}.")
    if not group["eps"] >= 0:
        raise ValueError(f"{where}: eps must be >= 0, got {group['eps']}.")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}.")
