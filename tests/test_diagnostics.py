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


# ------------------------------------------------------------------------- precision and report_to backends
def _old_float32_difference_norm(up0, down0, up1, down1):
    left = torch.cat([up1.float(), -up0.float()], dim=1)
    right = torch.cat([down1.float(), down0.float()], dim=0)
    return torch.linalg.matrix_norm(torch.linalg.qr(left)[1] @ torch.linalg.qr(right.T)[1].T, ord=2)


@pytest.mark.parametrize("relative_step", [1e-7, 1e-6, 1e-4])
def test_tiny_late_training_update_is_measured_exactly(relative_step):
    """A step of ~1e-6 of the weights (lr 1e-6 at the end of a cosine schedule) on a real model's float32 factors:
    the measured ‖ΔW‖₂ is the float64 truth of the stored weights, not float32 cancellation noise."""
    from hf_lowrank import LowRankLlamaForCausalLM, preset_config

    torch.manual_seed(0)
    layer = LowRankLlamaForCausalLM(preset_config("small")).model.layers[0].mlp.down_proj
    up0, down0 = layer.up.weight.detach(), layer.down.weight.detach()  # float32, as trained
    g = torch.Generator().manual_seed(1)
    up1 = up0 + relative_step * up0.abs().mean() * torch.randn(up0.shape, generator=g)
    down1 = down0 + relative_step * down0.abs().mean() * torch.randn(down0.shape, generator=g)
    truth = torch.linalg.matrix_norm(up1.double() @ down1.double() - up0.double() @ down0.double(), 2).item()
    measured = lowrank_difference_spectral_norm(up0, down0, up1, down1).item()
    assert measured == pytest.approx(truth, rel=1e-4)
    if relative_step == 1e-7:
        # What the float32 formula reported: below float32's resolution of the products (eps 1.2e-7) it measures
        # rounding noise, several times the update itself (6-7x seen on an AMD EPYC at 1 and 2 threads; at 1e-6
        # the error is 10-40% and depends on the CPU and thread count, so it is not asserted there).
        assert abs(_old_float32_difference_norm(up0, down0, up1, down1).item() - truth) > 0.5 * truth


def test_diagnostics_reach_report_to_backends_with_a_plain_trainer(tmp_path, monkeypatch):
    """A stock `Trainer` with a `report_to` backend: the backend's `on_log` sees the diag/* values of each step.

    No reporting package (tensorboard, wandb, ...) is installed here, so the backend is a recorder registered in
    Transformers' own `INTEGRATION_TO_CALLBACK` table: `report_to="recorder"` puts it where TensorBoard would go.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations import integration_utils

    from hf_lowrank import LowRankLlamaForCausalLM, preset_config
    from hf_lowrank.training.diagnostics import SpectralDiagnosticsCallback

    written, began = [], []

    class Recorder(TrainerCallback):  # what TensorBoardCallback does: write the log dict when on_log runs
        def on_log(self, args, state, control, logs=None, **kwargs):
            written.append((state.global_step, dict(logs)))

    class After(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            began.append(1)

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=4,
                             use_cpu=True, report_to="recorder", save_strategy="no", learning_rate=1e-3)  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(model=LowRankLlamaForCausalLM(preset_config("tiny")), args=args, train_dataset=data,
                      callbacks=[SpectralDiagnosticsCallback(every=2), After()])  # fmt: skip
    trainer.train()
    logged = {step: logs for step, logs in written if "loss" in logs}
    assert sorted(logged) == [2, 4]
    for step, logs in logged.items():
        assert logs["diag/update_norm_max"] > 0 and "diag/sigma_up_max" in logs, (step, sorted(logs))
    history = {row["step"]: row for row in trainer.state.log_history if "loss" in row}
    assert history[4]["diag/update_norm_max"] == logged[4]["diag/update_norm_max"]
    assert began == [1]  # moving itself ahead of the backends skipped no other callback


# ------------------------------------------------------------------------- exploded factors never crash a run
@pytest.fixture
def strict_lapack(monkeypatch):
    """LAPACK as oneMKL behaves on some CPUs (AMD EPYC): a non-finite input raises `LinAlgError` instead of giving
    NaN. Installed on every CPU, so the tests below fail wherever the diagnostics hand LAPACK such a matrix."""
    for name in ("qr", "matrix_norm", "svdvals", "svd"):
        original = getattr(torch.linalg, name)

        def strict(matrix, *args, _original=original, _name=name, **kwargs):
            if not torch.isfinite(matrix).all():
                raise torch.linalg.LinAlgError(f"linalg.{_name}: The algorithm failed to converge (non-finite input)")
            return _original(matrix, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, strict)


@pytest.mark.parametrize("planted", [math.inf, -math.inf, math.nan, 1e30])
def test_spectral_helpers_are_safe_on_exploded_factors(strict_lapack, planted):
    from hf_lowrank.training.diagnostics import lowrank_product_spectral_norm

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(48, 4, generator=g), torch.randn(4, 40, generator=g)
    up_after, down_after = up.clone(), down.clone()
    up_after[3, 1] = planted
    down_after[2] *= 1e10 if math.isfinite(planted) else 1.0  # 1e30 · 1e10: the product overflows float32
    norms = {
        "sigma_up": spectral_norm(up_after),
        "weight": lowrank_product_spectral_norm(up_after, down_after),
        "update": lowrank_difference_spectral_norm(up, down, up_after, down_after),
        "dense update": spectral_norm(up_after.double() - up.double()),
    }
    for what, norm in norms.items():
        assert norm.dtype in (torch.float32, torch.float64) and norm.ndim == 0, what
        if math.isnan(planted):
            assert torch.isnan(norm), what
        elif math.isinf(planted):
            assert torch.isinf(norm) and norm > 0, what
        else:
            assert norm > 1e29, what  # finite input: a real measurement (inf only beyond float32's range)
    assert math.isfinite(lowrank_product_spectral_norm(up * 1e18, down * 1e18).item())  # 1e36: float64 inside


def test_exploded_training_is_stopped_by_the_guard_not_by_a_measurement(tmp_path, tiny_data, strict_lapack):
    """The sweep's planted divergence (naive low-rank AdamW at lr 1e30, diagnostics every step): the first update
    blows the factors up to ~1e31, ‖W‖₂ is logged as inf, every later step is non-finite and skipped, and the step
    guard stops the run with its own error after `max_consecutive_nonfinite` (5) of them."""
    from trainers import tiny_trainer

    from hf_lowrank.training.arguments import OptimizerArguments
    from hf_lowrank.training.diagnostics import SpectralDiagnosticsCallback
    from hf_lowrank.training.guards import NonFiniteTrainingError

    diagnostics = SpectralDiagnosticsCallback(every=1)
    trainer = tiny_trainer(
        tmp_path, tiny_data, dict(max_steps=10, learning_rate=1e30, save_strategy="no", max_grad_norm=1.0),
        optimizer_args=OptimizerArguments(optimizer="adamw"), callbacks=[diagnostics],
    )  # fmt: skip
    with pytest.raises(NonFiniteTrainingError):
        trainer.train()
    logged = [row for row in trainer.state.log_history if "diag/weight_norm_max" in row]
    assert len(logged) == 6 and trainer.state.global_step == 6  # one update applied, five skipped, then the stop
    assert math.isinf(logged[0]["diag/weight_norm_max"]) and logged[0]["diag/sigma_up_max"] > 1e20


def test_a_plain_trainer_logs_the_spike_count_only_with_a_detector(tmp_path):
    """README: the spike count is logged when a `LossSpikeDetector` is attached; with a plain `Trainer` the callback
    feeds it the logged losses (nothing else does), so a planted spike is counted; without one, no count."""
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import LowRankLlamaForCausalLM, preset_config
    from hf_lowrank.training.diagnostics import SpectralDiagnosticsCallback

    class SpikeAtStep5(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * 3 if self.state.global_step == 4 else loss  # the loss logged at step 5 triples

    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    counts = {}
    for attached in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path / str(attached)), max_steps=6, logging_steps=1, report_to=[],
                                 per_device_train_batch_size=4, use_cpu=True, save_strategy="no", learning_rate=1e-4)  # fmt: skip
        detector = LossSpikeDetector(window=3, threshold=3.0, min_increase=0.05, warmup=0) if attached else None
        torch.manual_seed(0)
        trainer = SpikeAtStep5(model=LowRankLlamaForCausalLM(preset_config("tiny")), args=args, train_dataset=data,
                               callbacks=[SpectralDiagnosticsCallback(every=1, spike_detector=detector)])  # fmt: skip
        trainer.train()
        counts[attached] = [row.get("diag/loss_spikes") for row in trainer.state.log_history if "loss" in row]
    assert counts[True] == [0, 0, 0, 0, 1, 1]
    assert counts[False] == [None] * 6
