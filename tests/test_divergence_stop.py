"""`--divergence_patience`: the step guard stops a run whose loss stays above its first step's loss, through the
real pretraining path; and the ‖W‖₂ diagnostic of a factor pair without forming the product."""

import json
import math

import pytest
import torch

from hf_lowrank.training.arguments import RunArguments
from hf_lowrank.training.diagnostics import lowrank_product_spectral_norm
from hf_lowrank.training.guards import APPLY, StepGuard, TrainingDivergedError


def test_divergence_patience_on_synthetic_series():
    guard = StepGuard(divergence_patience=3)
    # Above the first loss twice, back below (the count restarts), then three times in a row: stop.
    for step, loss in enumerate([5.0, 5.5, 5.2, 4.9, 5.1, 5.3], start=1):
        assert guard.decide(loss, True, step=step) == APPLY
    with pytest.raises(TrainingDivergedError, match="--divergence_patience=3"):
        guard.decide(6.0, True, step=7)
    # Non-finite steps neither set the first loss nor count: they are the non-finite guard's business.
    guard = StepGuard(divergence_patience=2, max_consecutive_nonfinite=5)
    guard.decide(math.nan, True, step=1)
    guard.decide(4.0, True, step=2)
    assert guard.initial_loss == 4.0
    # Off by default, and its state survives a checkpoint (plain JSON), also from a checkpoint written before it.
    guard = StepGuard()
    assert all(guard.decide(10.0 + i, True, step=i) == APPLY for i in range(100))
    watched = StepGuard(divergence_patience=3)
    watched.decide(5.0, True, step=1), watched.decide(6.0, True, step=2), watched.decide(6.0, True, step=3)
    clone = StepGuard(divergence_patience=3)
    clone.load_state_dict(json.loads(json.dumps(watched.state_dict())))
    with pytest.raises(TrainingDivergedError):
        clone.decide(6.0, True, step=4)
    old_state = {k: v for k, v in watched.state_dict().items() if k not in ("initial_loss", "steps_above_initial")}
    StepGuard(divergence_patience=3).load_state_dict(old_state)
    with pytest.raises(ValueError, match="divergence_patience"):
        StepGuard(divergence_patience=-1)
    with pytest.raises(ValueError, match="divergence_patience"):
        RunArguments(divergence_patience=-1)


@pytest.mark.parametrize("shape", [(64, 8, 172), (172, 16, 64)])
def test_product_spectral_norm_equals_the_dense_norm(shape):
    out_features, rank, in_features = shape
    generator = torch.Generator().manual_seed(0)
    up = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
    down = torch.randn(rank, in_features, generator=generator, dtype=torch.float64) * 3
    expected = torch.linalg.matrix_norm(up @ down, ord=2)
    assert lowrank_product_spectral_norm(up, down).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pretrain_stops_a_diverged_run(tmp_path):
    """Naive AdamW at lr 3 on the tiny model: the loss jumps above its first value and stays; the run stops
    after `--divergence_patience` steps instead of spending the rest of its budget, and says why."""
    from hf_lowrank.training.pretrain import parse_args, run

    argv = [
        "--output_dir", str(tmp_path / "run"), "--preset", "tiny", "--max_corpus_bytes", "150000",
        "--per_device_train_batch_size", "8", "--max_steps", "60", "--optimizer", "adamw", "--learning_rate", "3",
        "--warmup_steps", "0", "--save_strategy", "no", "--divergence_patience", "4", "--use_cpu",
        "--report_to", "none",
    ]  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="stayed above the first step's loss") as error:
        run(*parse_args(argv))
    step = int(str(error.value).split(":")[0].split()[-1])
    assert step < 60
