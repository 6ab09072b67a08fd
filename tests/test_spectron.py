"""Spectron's math (Newton–Schulz, power iteration, the bound), its state, ablation switches and AdamW groups."""

import io

import pytest
import torch
from conftest import SPECTRON_VARIANTS

from hf_lowrank.optim import (
    Spectron,
    SpectronHyperparameters,
    init_power_vectors,
    init_spectron_state,
    newton_schulz,
    power_iteration,
    rebalance_pair,
    spectral_norm,
    spectral_normalize,
    spectron_pair_update,
)

OUT, RANK, IN = 96, 12, 80
LR = 0.05
VARIANTS = SPECTRON_VARIANTS


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_pair(scale_up=1.0, scale_down=1.0, seed=0, dtype=torch.float32, shape=(OUT, RANK, IN)):
    """``(up (out, r), down (r, in), target (out, in))``: factors of spectral norm ~ scale each."""
    out, rank, inn = shape
    g = gen(seed)
    up = torch.randn(out, rank, generator=g) * scale_up / out**0.5
    down = torch.randn(rank, inn, generator=g) * scale_down / inn**0.5
    target = torch.randn(out, inn, generator=g) / (out * inn) ** 0.25
    return up.to(dtype).requires_grad_(), down.to(dtype).requires_grad_(), target


def set_grads(up, down, target):
    """Gradients of ``0.5 ‖up @ down − target‖²``: changes every step, like a real loss."""
    up.grad = down.grad = None
    loss = 0.5 * ((up.float() @ down.float() - target) ** 2).sum()
    loss.backward()
    return loss.item()


def opnorm(m):
    return torch.linalg.matrix_norm(m.detach().float(), ord=2).item()


# ---------------------------------------------------------------- Newton–Schulz
@pytest.mark.parametrize("shape", [(256, 32), (32, 256), (128, 16), (64, 48)])
@pytest.mark.parametrize("condition", [1.0, 100.0])
def test_newton_schulz_approximates_the_polar_factor(shape, condition):
    m = torch.randn(*shape, generator=gen(1))
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    if condition > 1:  # singular values spread over [1/condition, 1]
        m = u @ torch.diag(torch.logspace(0, -torch.tensor(condition).log10().item(), u.shape[1])) @ vh
    ortho = newton_schulz(m)
    assert ortho.shape == m.shape and ortho.dtype == torch.float32
    # Observed for Muon's coefficients, 5 steps: [0.68, 1.14] for condition numbers up to 100.
    singular_values = torch.linalg.svdvals(ortho)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25, singular_values
    polar = u @ vh
    cosine = (ortho * polar).sum() / (ortho.norm() * polar.norm())
    assert cosine > 0.97


def test_newton_schulz_uses_the_gram_hook_once_per_step():
    calls = []

    def counting_gram(x):
        calls.append(tuple(x.shape))
        return x.mT @ x

    m = torch.randn(20, 100, generator=gen(2))  # wide: handled as the tall (100, 20)
    torch.testing.assert_close(newton_schulz(m, gram_fn=counting_gram), newton_schulz(m))
    assert calls == [(100, 20)] * 5


def test_spectral_norm_and_normalize_are_exact():
    m = torch.randn(70, 9, generator=gen(3)) * 5
    torch.testing.assert_close(spectral_norm(m), torch.linalg.svdvals(m)[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(spectral_norm(m.T), torch.linalg.svdvals(m)[0], rtol=1e-5, atol=0)
    assert opnorm(spectral_normalize(m.T)) == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- power iteration
def test_power_iteration_from_the_deterministic_start_and_warm_started():
    w = torch.randn(256, 32, generator=gen(4))
    top = torch.linalg.svdvals(w)[0].item()
    u, v = init_power_vectors(w)
    sigma, _, _ = power_iteration(w, u, v, iters=10)
    assert 0.95 * top <= sigma.item() <= top * (1 + 1e-5)  # observed 0.965 for this Gaussian (close σ₁, σ₂)
    for _ in range(200):  # one round per call, warm-started, as in training
        sigma, u, v = power_iteration(w, u, v, iters=1)
    assert sigma.item() == pytest.approx(top, rel=1e-3)


def test_power_vectors_are_deterministic_and_unit():
    w = torch.empty(50, 7)
    (u1, v1), (u2, v2) = init_power_vectors(w), init_power_vectors(w)
    assert torch.equal(u1, u2) and torch.equal(v1, v2)
    assert u1.shape == (50,) and v1.shape == (7,)
    assert u1.norm().item() == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------- the bound ‖ΔW‖₂ ≤ lr
@pytest.mark.parametrize("scale_up, scale_down", [(1.0, 1.0), (1e3, 1e-3), (1e-3, 1e3), (1e3, 1e3), (1e-3, 1e-3)])
def test_first_step_respects_the_spectral_bound_where_adamw_does_not(scale_up, scale_down):
    def delta_w(make_optimizer):
        up, down, target = make_pair(scale_up, scale_down)
        before = (up @ down).detach()
        optimizer = make_optimizer(up, down)
        set_grads(up, down, target)
        optimizer.step()
        return opnorm(up @ down - before)

    # The bound is approximate: NS singular values reach ~1.14; observed ‖ΔW‖₂/lr ≤ 1.08 here.
    assert delta_w(lambda up, down: Spectron([(up, down)], lr=LR)) <= LR * 1.25
    assert delta_w(lambda up, down: torch.optim.AdamW([up, down], lr=LR)) > 5 * LR


def test_bound_holds_over_many_steps_with_drifting_factors():
    up, down, target = make_pair(30.0, 1 / 30.0)
    optimizer = Spectron([(up, down)], lr=LR)
    for _ in range(15):
        set_grads(up, down, target)
        before = (up @ down).detach()
        optimizer.step()
        assert opnorm(up @ down - before) <= LR * 1.25


def test_first_step_measures_sigma_with_first_power_iters():
    up, down, target = make_pair(seed=5, shape=(256, 32, 200))
    true_up, true_down = opnorm(up), opnorm(down)
    optimizer = Spectron([(up, down)], lr=1e-6)  # a negligible step: σ is that of the initial factors
    set_grads(up, down, target)
    optimizer.step()
    assert optimizer.state[up]["sigma"].item() == pytest.approx(true_up, rel=0.05)
    assert optimizer.state[down]["sigma"].item() == pytest.approx(true_down, rel=0.05)


# ---------------------------------------------------------------- ablation switches
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ablation_switches_behave_as_documented(variant):
    up, down, target = make_pair(3.0, 0.5)
    set_grads(up, down, target)
    grad_up = up.grad.clone()
    before_up, before_down = up.detach().clone(), down.detach().clone()
    state_up, state_down = init_spectron_state(up), init_spectron_state(down)
    rho = spectron_pair_update(
        up.data, down.data, up.grad, down.grad, state_up, state_down, lr=LR, power_iters=10, **VARIANTS[variant]
    ).item()
    step_up, step_down = opnorm(up - before_up), opnorm(down - before_down)
    renormalize = VARIANTS[variant].get("renormalize", True)
    orthogonalize = VARIANTS[variant].get("orthogonalize", True)
    expected_rho = LR / (state_up["sigma"] + state_down["sigma"] + 1).item() if renormalize else LR
    assert rho == pytest.approx(expected_rho, rel=1e-6)
    if renormalize:
        assert rho < LR / 3  # σ_up ≈ 3 shrinks the step
    u, _, vh = torch.linalg.svd(grad_up, full_matrices=False)
    direction = -(up - before_up).detach()
    cosine_to_grad = (direction * grad_up).sum() / (direction.norm() * grad_up.norm())
    cosine_to_polar = (direction * (u @ vh)).sum() / (direction.norm() * (u @ vh).norm())
    if orthogonalize:  # NS: ‖ΔA‖₂ ≈ ρ within NS's band, in the direction of the gradient's polar factor
        assert 0.6 * rho < step_up < 1.25 * rho and 0.6 * rho < step_down < 1.25 * rho
        assert cosine_to_polar > 0.97 and cosine_to_polar > cosine_to_grad + 0.01
    else:  # momentum scaled to unit spectral norm: ‖ΔA‖₂ = ρ exactly, in the gradient's direction
        assert step_up == pytest.approx(rho, rel=1e-4) and step_down == pytest.approx(rho, rel=1e-4)
        assert cosine_to_grad > 1 - 1e-5 and cosine_to_polar < cosine_to_grad - 0.01


# ---------------------------------------------------------------- rebalancing
def test_rebalance_pair_keeps_the_product_and_equalizes_norms():
    up, down, target = make_pair(20.0, 0.05)
    state_up, state_down = init_spectron_state(up), init_spectron_state(down)
    set_grads(up, down, target)
    state_up["momentum_buffer"].copy_(up.grad)
    state_down["momentum_buffer"].copy_(down.grad)
    product = (up @ down).detach().clone()
    c = rebalance_pair(up.data, down.data, state_up, state_down, power_iters=30).item()
    assert c == pytest.approx((0.05 / 20.0) ** 0.5, rel=0.1)
    torch.testing.assert_close((up @ down).detach(), product, rtol=1e-5, atol=1e-6)
    assert opnorm(up) == pytest.approx(opnorm(down), rel=1e-3)
    # the momenta now equal the gradients of the rebalanced factors
    set_grads(up, down, target)
    torch.testing.assert_close(state_up["momentum_buffer"], up.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state_down["momentum_buffer"], down.grad, rtol=1e-4, atol=1e-6)


def test_rebalance_every_k_steps_in_the_optimizer():
    up, down, target = make_pair(20.0, 0.05)
    optimizer = Spectron([(up, down)], lr=1e-3, rebalance_every=3, power_iters=2)
    for step in range(1, 7):
        set_grads(up, down, target)
        optimizer.step()
        ratio = opnorm(up) / opnorm(down)
        assert (ratio == pytest.approx(1.0, rel=0.02)) == (step >= 3), (step, ratio)


# ---------------------------------------------------------------- dtypes and degenerate inputs (R12)
def test_bf16_factors_stay_bf16_and_finite():
    up, down, target = make_pair(dtype=torch.bfloat16)
    optimizer = Spectron([(up, down)], lr=LR, weight_decay=0.1, rebalance_every=2)
    before = up.detach().clone()
    for _ in range(4):
        set_grads(up, down, target)
        optimizer.step()
    assert up.dtype == down.dtype == torch.bfloat16
    assert torch.isfinite(up).all() and torch.isfinite(down).all() and not torch.equal(up, before)
    assert optimizer.state[up]["momentum_buffer"].dtype == torch.float32


def _degenerate(case):
    up, down, target = make_pair()
    with torch.no_grad():
        if case == "zero":
            up.zero_(), down.zero_()
        elif case == "tiny":
            up.mul_(1e-30), down.mul_(1e-30)
        elif case == "rank_deficient":
            up.copy_(up[:, :1].expand_as(up))  # rank 1
            down[3:].zero_()
        elif case == "huge":
            up.mul_(1e6), down.mul_(1e6)
            target.mul_(1e12)
    return up, down, target


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", ["zero", "tiny", "rank_deficient", "huge", "zero_grad"])
def test_degenerate_factors_and_grads_give_finite_updates(case, variant):
    up, down, target = _degenerate("none" if case == "zero_grad" else case)
    optimizer = Spectron([(up, down)], lr=LR, rebalance_every=1, **VARIANTS[variant])
    before = (up @ down).detach().clone()
    for _ in range(3):
        set_grads(up, down, target)
        if case == "zero_grad":
            up.grad.zero_(), down.grad.zero_()
        optimizer.step()
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    for param in (up, down):
        assert all(torch.isfinite(t).all() for t in optimizer.state[param].values())
    if case in ("zero", "zero_grad"):  # nothing to follow: the product does not move
        torch.testing.assert_close((up @ down).detach(), before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- determinism, RNG, state round trip
def _mixed_optimizer(up, down, others, **options):
    groups = [
        {"params": [up, down], "name": "spectron:pair"},
        {"params": others, "algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.1, "name": "adamw:decay"},
    ]
    return Spectron(groups, lr=LR, weight_decay=0.01, rebalance_every=2, **options)


def _run(steps, dtype=torch.float32, optimizer=None, params=None):
    if params is None:
        up, down, target = make_pair(3.0, 0.3, dtype=dtype)
        other = torch.randn(10, 4, generator=gen(9), dtype=dtype).requires_grad_()
        params = (up, down, target, other)
    up, down, target, other = params
    optimizer = optimizer or _mixed_optimizer(up, down, [other])
    for _ in range(steps):
        set_grads(up, down, target)
        other.grad = (other.detach().float() - 1).to(other.dtype)
        optimizer.step()
    return params, optimizer


def test_two_identical_runs_are_bitwise_equal():
    (a_up, a_down, _, a_other), _ = _run(6)
    (b_up, b_down, _, b_other), _ = _run(6)
    assert torch.equal(a_up, b_up) and torch.equal(a_down, b_down) and torch.equal(a_other, b_other)


def test_optimizer_does_not_consume_the_global_rng():
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    _run(3)
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_gives_the_same_next_step(dtype):
    params, optimizer = _run(3, dtype)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    clones = tuple(p.detach().clone().requires_grad_() if p.requires_grad else p for p in params)
    fresh = _mixed_optimizer(clones[0], clones[1], [clones[3]])
    fresh.load_state_dict(loaded)
    assert fresh.state[clones[0]]["momentum_buffer"].dtype == torch.float32
    (up, down, _, other), _ = _run(2, optimizer=optimizer, params=params)
    (up2, down2, _, other2), _ = _run(2, optimizer=fresh, params=clones)
    assert torch.equal(up, up2) and torch.equal(down, down2) and torch.equal(other, other2)
    for key in ("momentum_buffer", "u", "v", "sigma", "step"):
        assert torch.equal(optimizer.state[params[0]][key], fresh.state[clones[0]][key])


# ---------------------------------------------------------------- AdamW groups
def test_adamw_groups_match_torch_adamw():
    ours = torch.randn(12, 7, generator=gen(6)).requires_grad_()
    norm = torch.randn(7, generator=gen(7)).requires_grad_()
    theirs, theirs_norm = ours.detach().clone().requires_grad_(), norm.detach().clone().requires_grad_()
    up, down, target = make_pair()
    spectron = Spectron(
        [
            (up, down),
            {"params": [ours], "algorithm": "adamw", "lr": 3e-3, "weight_decay": 0.1},
            {"params": [norm], "algorithm": "adamw", "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        ],
        lr=LR,
    )
    reference = torch.optim.AdamW(
        [
            {"params": [theirs], "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8},
            {"params": [theirs_norm], "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6},
        ],
        lr=3e-3,
    )
    for step in range(5):
        grad = torch.randn(12, 7, generator=gen(100 + step))
        grad_norm = torch.randn(7, generator=gen(200 + step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        norm.grad, theirs_norm.grad = grad_norm.clone(), grad_norm.clone()
        set_grads(up, down, target)
        spectron.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm, theirs_norm, rtol=1e-6, atol=1e-7)


def test_one_scheduler_drives_both_kinds_of_group():
    up, down, _ = make_pair()
    other = torch.zeros(3, requires_grad=True)
    optimizer = _mixed_optimizer(up, down, [other])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    optimizer.step(), scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [LR / 2, 1e-2 / 2]


# ---------------------------------------------------------------- validation
def _bad(**kwargs):
    up, down, _ = make_pair()
    return Spectron([(up, down)], **{"lr": LR, **kwargs})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _bad(lr=-1.0), "lr must be >= 0"),
        (lambda: _bad(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda: _bad(ns_steps=-1), "ns_steps"),
        (lambda: _bad(power_iters=0), "power_iters"),
        (lambda: _bad(weight_decay=-0.1), "weight_decay"),
        (lambda: _bad(rebalance_every=-2), "rebalance_every"),
        (lambda: _bad(eps=0.0), "eps"),
        (lambda: Spectron([{"params": list(make_pair()[:2]), "momentum": 2.0}], lr=LR), "momentum"),
        (lambda: Spectron([tuple(reversed(make_pair()[:2]))], lr=LR), r"\[up.weight, down.weight\]"),
        (lambda: Spectron([{"params": [make_pair()[0]]}], lr=LR), "exactly one factor pair"),
        (lambda: Spectron([(torch.zeros(4, 2), torch.zeros(3, 5))], lr=LR), "not a factor pair"),
        (lambda: Spectron([(torch.zeros(4, 2), torch.zeros(2))], lr=LR), "must be 2-D"),
        (lambda: Spectron([torch.zeros(4, 2)], lr=LR), "build_optimizer"),
        (lambda: Spectron([{"params": [torch.zeros(3)], "algorithm": "adamw"}], lr=LR), "must set its own 'lr'"),
        (
            lambda: Spectron(
                [{"params": [torch.zeros(3)], "algorithm": "adamw", "lr": 1e-3, "betas": (0.9, 1.0)}], lr=LR
            ),
            "betas",
        ),
        (lambda: Spectron([{"params": [torch.zeros(3)], "algorithm": "sgd"}], lr=LR), "Unknown 'algorithm'"),
    ],
)
def test_constructor_rejects_bad_settings(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_one_hyperparameter_record_gives_the_defaults_and_the_checks():
    up, down, _ = make_pair()
    optimizer = Spectron([(up, down)], lr=LR)
    assert optimizer.defaults == SpectronHyperparameters(lr=LR).as_dict()
    with pytest.raises(TypeError, match="momentun"):
        Spectron([(up, down)], lr=LR, momentun=0.9)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        SpectronHyperparameters(lr=LR, momentum=1.0)
    # Groups are plain dicts (schedulers write `lr` there): each step reads them back through the record.
    up.grad, down.grad = torch.ones_like(up), torch.ones_like(down)
    optimizer.param_groups[0]["power_iters"] = 0
    with pytest.raises(ValueError, match="group '': power_iters must be an integer >= 1"):
        optimizer.step()
