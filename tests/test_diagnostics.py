"""Spectral diagnostics (exact low-rank ‖ΔW‖₂ without dense matrices) and the loss-spike detector (R11)."""

import math
import random

import pytest
import torch

from hf_lowrank.training.diagnostics import LossSpikeDetector, lowrank_difference_spectral_norm, spectral_norm


@pytest.mark.parametrize("shape", [(96, 8, 64), (40, 5, 300), (7, 3, 9)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_lowrank_difference_norm_equals_dense(shape, scale):
    out_features, rank, in_features = shape
    g = torch.Generator().manual_seed(0)
    up0 = torch.randn(out_features, rank, generator=g) * scale
    down0 = torch.randn(rank, in_features, generator=g) / scale
    up1 = up0 + 0.01 * torch.randn(out_features, rank, generator=g) * scale
    down1 = down0 + 0.01 * torch.randn(rank, in_features, generator=g) / scale
    dense = torch.linalg.matrix_norm((up1 @ down1 - up0 @ down0).double(), 2)
    fast = lowrank_difference_spectral_norm(up0, down0, up1, down1)
    torch.testing.assert_close(fast.double(), dense, rtol=2e-3, atol=1e-6 * dense.item())


def test_spectral_norm_bf16_is_float32():
    w = torch.randn(32, 4, dtype=torch.bfloat16)
    assert spectral_norm(w).dtype == torch.float32
    torch.testing.assert_close(spectral_norm(w), torch.linalg.matrix_norm(w.float(), 2))


def noisy_series(n, seed=0, level=3.0, noise=0.02):
    rng = random.Random(seed)
    return [level - 0.001 * i + rng.gauss(0, noise) for i in range(n)]


def test_spike_detector_finds_planted_spikes_only():
    detector = LossSpikeDetector(window=20, threshold=4.0, min_increase=0.05, warmup=10)
    series = noisy_series(300)
    planted = {120: 4.5, 200: 3.9}
    flagged = []
    for step, loss in enumerate(series):
        if detector.update(planted.get(step, loss)):
            flagged.append(step)
    assert flagged == sorted(planted)
    assert detector.spikes == 2


def test_spike_detector_warmup_exemption_and_small_rises():
    detector = LossSpikeDetector(window=5, threshold=3.0, min_increase=0.05, warmup=30)
    series = [10.0, 9.0, 8.0, 7.0, 6.0, 5.9, 12.0] + noisy_series(30, level=5.0)
    assert not any(detector.update(x) for x in series[:8])  # a jump inside the warm-up is exempt
    quiet = LossSpikeDetector(window=10, threshold=2.0, min_increase=0.05, warmup=0)
    flat = [2.0 + 1e-6 * (i % 2) for i in range(20)] + [2.05]  # +2.5%: many sigmas, but below the relative floor
    assert not any(quiet.update(x) for x in flat)


def test_spike_detector_ignores_non_finite_and_round_trips():
    detector = LossSpikeDetector(window=10, threshold=4.0, warmup=0)
    for x in noisy_series(15):
        detector.update(x)
    assert detector.update(math.nan) is False and detector.update(math.inf) is False
    state = detector.state_dict()
    clone = LossSpikeDetector()
    clone.load_state_dict(state)
    tail = noisy_series(30, seed=1) + [9.0]
    assert [detector.update(x) for x in tail] == [clone.update(x) for x in tail]
    assert detector.state_dict() == clone.state_dict()


@pytest.mark.parametrize("kwargs", [dict(window=1), dict(threshold=0), dict(min_increase=-1), dict(warmup=-1)])
def test_spike_detector_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        LossSpikeDetector(**kwargs)
