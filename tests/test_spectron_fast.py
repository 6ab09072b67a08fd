"""The batched Spectron path (optim/batched.py) against the per-pair reference (optim/spectron.py).

Dion style: the reference is the specification; the fast path must give the same parameters and the same state
up to float32 rounding, on single functions, on whole steps with every ablation switch, and on a model.
"""

import io

import pytest
import torch
from conftest import SPECTRON_VARIANTS

from hf_lowrank import LowRankLlamaForCausalLM, build_optimizer, preset_config
from hf_lowrank.optim import NS_COEFFICIENTS, Spectron, init_spectron_state, newton_schulz, spectron_pair_update
from hf_lowrank.optim.batched import newton_schulz_many, spectron_update_batched

VARIANTS = SPECTRON_VARIANTS


def gen(seed):
    return torch.Generator().manual_seed(seed)


def conditioned(shape, condition, seed):
    """A matrix of ``shape`` with singular values log-spaced over [1/condition, 1]."""
    m = torch.randn(*shape, generator=gen(seed))
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    values = torch.logspace(0, -torch.tensor(float(condition)).log10().item(), min(shape))
    return u @ torch.diag(values) @ vh


def relative_error(fast, reference):
    return ((fast - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def newton_schulz_float64(m, steps):
    """The reference iteration in float64: the truth both float32 implementations are measured against."""
    a, b, c = NS_COEFFICIENTS
    x = m.double().mT if m.shape[0] < m.shape[1] else m.double()
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x.mT @ x
        x = a * x + x @ (b * s + c * s @ s)
    return x.mT if m.shape[0] < m.shape[1] else x


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("steps", [0, 1, 3, 5, 7])
def test_newton_schulz_many_matches_the_reference(condition, steps):
    # One rank (24), tall and wide, several long dimensions: one batched Gram iteration for all.
    momenta = [conditioned(shape, condition, seed) for seed, shape in enumerate([(240, 24), (24, 96), (100, 24)])]
    for fast, m in zip(newton_schulz_many(momenta, steps), momenta):
        reference, truth = newton_schulz(m, steps), newton_schulz_float64(m, steps)
        assert fast.shape == m.shape and fast.dtype == torch.float32
        # As accurate as the reference: observed within 1.5x of its float32 error (up to 3e-5 at 7 steps and
        # condition 1e4, where the iteration starts to amplify rounding in both).
        assert relative_error(fast.double(), truth) <= 2 * relative_error(reference.double(), truth) + 5e-6
        if steps <= 5:  # Spectron's regime: the two implementations agree to float32 rounding
            assert relative_error(fast, reference) < 2e-5


def test_newton_schulz_many_of_zero_is_zero():
    (out,) = newton_schulz_many([torch.zeros(64, 8)])
    assert torch.equal(out, torch.zeros(64, 8))


def _pairs(dtype, seed=0):
    """Pairs of several shapes: two of rank 8 sharing nothing but the rank, one of rank 6, one q-like repeat."""
    shapes = [(48, 8, 40), (40, 8, 108), (48, 6, 30), (48, 8, 40)]
    g = gen(seed)
    pairs = []
    for out, rank, inn in shapes:
        up = (torch.randn(out, rank, generator=g) / out**0.5).to(dtype)
        down = (torch.randn(rank, inn, generator=g) * 3 / inn**0.5).to(dtype)
        pairs.append((up, down))
    return pairs


def _grads(pairs, step):
    g = gen(1000 + step)
    return [
        (torch.randn(*up.shape, generator=g).to(up.dtype), torch.randn(*down.shape, generator=g).to(down.dtype))
        for up, down in pairs
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_update_matches_pair_update(variant, dtype):
    options = dict(lr=0.05, weight_decay=0.1, **VARIANTS[variant])
    fast, slow = _pairs(dtype), _pairs(dtype)
    fast_states = [(init_spectron_state(u), init_spectron_state(d)) for u, d in fast]
    slow_states = [(init_spectron_state(u), init_spectron_state(d)) for u, d in slow]
    for step in range(3):
        grads = _grads(fast, step)
        power_iters = 10 if step == 0 else 1
        rho_fast = spectron_update_batched(
            [u for u, _ in fast],
            [d for _, d in fast],
            [g for g, _ in grads],
            [g for _, g in grads],
            [s for s, _ in fast_states],
            [s for _, s in fast_states],
            power_iters=power_iters,
            **options,
        )
        rho_slow = torch.stack(
            [
                spectron_pair_update(u, d, gu, gd, su, sd, power_iters=power_iters, **options)
                for (u, d), (gu, gd), (su, sd) in zip(slow, grads, slow_states)
            ]
        )
        torch.testing.assert_close(rho_fast, rho_slow, rtol=1e-6, atol=0)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for (fu, fd), (su, sd) in zip(fast, slow):
        assert fu.dtype == dtype
        torch.testing.assert_close(fu, su, **tolerance)
        torch.testing.assert_close(fd, sd, **tolerance)
    for pair_fast, pair_slow in zip(fast_states, slow_states):
        for state_fast, state_slow in zip(pair_fast, pair_slow):
            assert state_fast.keys() == state_slow.keys()
            for key in state_fast:
                assert state_fast[key].dtype == state_slow[key].dtype
                torch.testing.assert_close(state_fast[key], state_slow[key], rtol=1e-5, atol=1e-6)


def _train(batched, steps=4, optimizer_state=None):
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny"))
    optimizer = build_optimizer(
        model,
        "spectron",
        lr=0.05,
        adamw_lr=1e-2,
        weight_decay=0.01,
        adamw_weight_decay=0.1,
        rebalance_every=3,
        batched=batched,
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen(5))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, optimizer, losses


def test_optimizer_paths_agree_on_a_model_and_share_one_state_format():
    fast_model, fast_optimizer, fast_losses = _train(batched=True)
    slow_model, slow_optimizer, slow_losses = _train(batched=False)
    assert fast_losses == pytest.approx(slow_losses, rel=1e-5)
    for (name, fast), slow in zip(fast_model.named_parameters(), slow_model.parameters()):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6, msg=name)
    fast_state, slow_state = fast_optimizer.state_dict(), slow_optimizer.state_dict()
    assert fast_state["param_groups"] == slow_state["param_groups"]
    for index, state in slow_state["state"].items():
        assert {k: (v.dtype, v.shape) for k, v in fast_state["state"][index].items()} == {
            k: (v.dtype, v.shape) for k, v in state.items()
        }


def test_a_checkpoint_of_one_path_resumes_on_the_other():
    _, optimizer, _ = _train(batched=True, steps=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)

    def load():  # a fresh copy each time: loading shares tensors with the dict, and steps update them in place
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    # Same starting weights (seeded), same state: the two paths take the same next steps.
    resumed_slow, _, losses_slow = _train(batched=False, steps=2, optimizer_state=load())
    resumed_fast, _, losses_fast = _train(batched=True, steps=2, optimizer_state=load())
    assert losses_fast == pytest.approx(losses_slow, rel=1e-5)
    for fast, slow in zip(resumed_fast.parameters(), resumed_slow.parameters()):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_fused_adamw_groups_match_the_reference_adamw():
    params = {batched: torch.randn(12, 7, generator=gen(6)).requires_grad_() for batched in (True, False)}
    optimizers = {
        batched: Spectron(
            [{"params": [p], "algorithm": "adamw", "lr": 3e-3, "weight_decay": 0.1}], lr=0.05, batched=batched
        )
        for batched, p in params.items()
    }
    for step in range(5):
        grad = torch.randn(12, 7, generator=gen(100 + step))
        for batched, p in params.items():
            p.grad = grad.clone()
            optimizers[batched].step()
    torch.testing.assert_close(params[True], params[False], rtol=1e-6, atol=1e-7)
    assert optimizers[True].state[params[True]]["step"].item() == 5.0
