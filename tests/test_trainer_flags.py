"""Every `TrainingArguments` flag that `LowRankTrainer` touches is honoured or refused (issue 17, item 5): the flags of
Trainer's own optimizer factory are refused before anything is written, AdamW's epsilon and betas reach every AdamW
group, and AdamW has one default across the Python API and `hf-lowrank pretrain`."""

import pytest
import torch
from conftest import tiny_model
from test_cli import assert_one_error_line
from trainers import TINY_TRAINING_ARGS, tiny_trainer
from transformers import TrainingArguments

from hf_lowrank.cli import main
from hf_lowrank.optim import ADAMW_DEFAULTS, Spectron, build_optimizer
from hf_lowrank.training.arguments import OptimizerArguments, PretrainingArguments
from hf_lowrank.training.trainer import LowRankTrainer


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--optim", "adafactor", "--adam_epsilon", "0.5"], "--optim adafactor is not used"),
        (["--optim", "sgd"], "builds its optimizer from --optimizer"),
        (["--optim_args", "beta1=0.5"], "--optim_args 'beta1=0.5' is not used"),
        (["--optim_target_modules", "q_proj"], "Choose the factorized projections with --lowrank_modules"),
        (["--adafactor"], "unrecognized arguments: --adafactor"),
    ],
)
def test_trainer_optimizer_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, fragment):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--max_steps", "2", "--output_dir", str(out), *flags]) == 2
    assert_one_error_line(capsys.readouterr().err, "pretrain", fragment)
    assert not out.exists()


def test_the_python_api_refuses_them_too(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="adafactor", **TINY_TRAINING_ARGS)
    with pytest.raises(ValueError, match="--optim adafactor is not used"):
        LowRankTrainer(model=tiny_model(), args=args, train_dataset=[])


def _adamw_groups(optimizer):
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return [g for g in optimizer.param_groups if g.get("algorithm", "adamw") == "adamw"]


@pytest.mark.parametrize("optimizer", ["spectron", "muon", "renorm", "adamw"])
def test_adam_epsilon_and_betas_reach_every_adamw_group(tmp_path, tiny_data, optimizer):
    trainer = tiny_trainer(
        tmp_path, tiny_data, dict(max_steps=1, adam_epsilon=0.5, adam_beta1=0.8, adam_beta2=0.9), optimizer=optimizer
    )
    groups = _adamw_groups(trainer.create_optimizer())
    assert groups and all(g["eps"] == 0.5 and tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def test_one_adamw_default_for_the_python_api_and_pretrain(tmp_path):
    cli = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert (cli.adam_beta1, cli.adam_beta2, cli.adam_epsilon) == (*ADAMW_DEFAULTS.betas, ADAMW_DEFAULTS.eps)
    assert ADAMW_DEFAULTS.betas == (0.9, 0.95)
    model = tiny_model()
    for optimizer in (build_optimizer(model, "adamw", 1e-3), build_optimizer(model, "spectron", 0.02)):
        groups = _adamw_groups(optimizer)
        assert all(tuple(g["betas"]) == ADAMW_DEFAULTS.betas and g["eps"] == ADAMW_DEFAULTS.eps for g in groups)
    assert Spectron([(model.model.layers[0].mlp.up_proj.up.weight, model.model.layers[0].mlp.up_proj.down.weight)],
                    lr=0.02)._adamw_defaults["betas"] == ADAMW_DEFAULTS.betas  # fmt: skip


def test_the_study_records_the_betas_it_trained_with():
    from hf_lowrank.experiments.plan import StudySettings

    settings = StudySettings()
    assert settings.adamw_betas == (0.9, 0.999)  # what every committed record was trained with
    assert settings.fingerprint() == "f3eec68e6784"  # the committed records' fingerprint: they stay valid
    assert StudySettings(adamw_betas=(0.9, 0.95)).fingerprint() != settings.fingerprint()


def test_optimizer_cls_and_kwargs_is_honoured_and_guarded(tmp_path, tiny_data):
    trainer = tiny_trainer(
        tmp_path, tiny_data, dict(max_steps=2, save_strategy="no"),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.01, "momentum": 0.5}),
    )  # fmt: skip
    trainer.train()
    inner = trainer.optimizer.optimizer
    while not isinstance(inner, torch.optim.SGD) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    assert isinstance(inner, torch.optim.SGD) and inner.param_groups[0]["momentum"] == 0.5
    assert trainer.state.global_step == 2


def test_lr_scheduler_kwargs_are_honoured(tmp_path, tiny_data):
    trainer = tiny_trainer(
        tmp_path, tiny_data,
        dict(max_steps=4, save_strategy="no", lr_scheduler_type="cosine_with_min_lr",
             lr_scheduler_kwargs={"min_lr": 0.005}),
        optimizer_args=OptimizerArguments(optimizer="spectron", adamw_learning_rate=0.02),
    )  # fmt: skip
    trainer.train()
    rates = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert min(rates) >= 0.005 - 1e-12 and rates[0] > 0.005
