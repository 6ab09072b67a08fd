"""Muon as a first-class optimizer (issue 18, item 1): `--optimizer muon` trains every hidden matrix with Muon, dense
projections whole and factor pairs factor by factor, with the same maths and units (‖ΔW‖₂ ≈ lr) on both; its state
checkpoints and resumes exactly."""

import pytest
import torch
from conftest import tiny_model
from trainers import tiny_trainer

from hf_lowrank.optim import (
    build_optimizer,
    init_muon_state,
    init_spectron_state,
    muon_update,
    spectron_pair_update,
)


def test_a_dense_muon_step_is_the_factor_step_applied_to_a_whole_matrix():
    """The factorized "orthogonalization only" step moves each factor by lr·NS(M); dense Muon moves the whole
    matrix by the same formula, so on the same matrix and gradient the two give the same bits."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(48, 8, generator=g), torch.randn(8, 40, generator=g)
    grads = [torch.randn(48, 8, generator=g), torch.randn(8, 40, generator=g)]
    dense, dense_state = up.clone(), init_muon_state(up)
    states = [init_spectron_state(up), init_spectron_state(down)]
    options = dict(lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.1, eps=1e-7)
    for _ in range(3):
        spectron_pair_update(up, down, *grads, *states, renormalize=False, **options)
        muon_update(dense, grads[0], dense_state, **options)
        grads = [grad * 0.5 + 0.1 for grad in grads]
    assert torch.equal(dense, up) and torch.equal(dense_state["momentum_buffer"], states[0]["momentum_buffer"])
    assert dense_state["step"] == 3


@pytest.mark.parametrize("shape", [(64, 64), (172, 64), (64, 172)])
def test_lr_is_the_spectral_norm_of_the_dense_update(shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(*shape, generator=g) * 0.02
    before, state = weight.clone(), init_muon_state(weight)
    muon_update(weight, torch.randn(*shape, generator=g), state, lr=0.01, momentum=0.0)
    # Newton–Schulz leaves singular values in about [0.68, 1.14] (docs/optimizer.md), so ‖ΔW‖₂ ≈ lr
    assert 0.6 * 0.01 < torch.linalg.matrix_norm(weight - before, ord=2).item() < 1.2 * 0.01


def test_muon_on_a_partly_factorized_model_uses_both_paths():
    model = tiny_model("lowrank", lowrank_modules=["q_proj", "down_proj"])
    optimizer = build_optimizer(model, "muon", lr=0.02, weight_decay=0.01)
    by_algorithm = {}
    for group in optimizer.param_groups:
        by_algorithm.setdefault(group["algorithm"], []).append(group)
    assert len(by_algorithm["spectron"]) == 2 * model.config.num_hidden_layers  # q_proj, down_proj: factor by factor
    assert all(not g["renormalize"] and g["orthogonalize"] for g in by_algorithm["spectron"])
    (muon,) = by_algorithm["muon"]  # the 5 other projections of every layer, whole
    assert len(muon["params"]) == 5 * model.config.num_hidden_layers
    assert (muon["lr"], muon["weight_decay"], muon["momentum"], muon["ns_steps"]) == (0.02, 0.01, 0.95, 5)
    assert "renormalize" not in muon and "power_iters" not in muon  # meaningless for a whole matrix
    with pytest.raises(ValueError, match="Muon orthogonalizes matrices"):
        optimizer.add_param_group({"params": [torch.zeros(4, requires_grad=True)], "algorithm": "muon"})


def test_dense_muon_trains_and_resumes_exactly(tmp_path, tiny_data):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, warmup_steps=1, learning_rate=0.02)

    def trainer(folder):
        return tiny_trainer(tmp_path / folder, tiny_data, settings, model_overrides={"lowrank_modules": []},
                            optimizer="muon")  # fmt: skip

    straight = trainer("straight")
    straight.train()
    losses = [row["loss"] for row in straight.state.log_history if "loss" in row]
    assert losses[-1] < losses[0]
    state = straight.optimizer.state_dict()["state"]
    assert {"momentum_buffer", "step"} <= state[0].keys()  # the Muon group comes first; tensors only
    resumed = trainer("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    rows = [(r["step"], r["loss"], r["grad_norm"]) for r in straight.state.log_history if "loss" in r]
    # the resumed history holds steps 1-3 from the checkpoint and 4-6 trained after it: bitwise the straight run's
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed.state.log_history if "loss" in r] == rows
