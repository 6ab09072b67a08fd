"""Pretraining through the HF Trainer: the CLI end to end, LR schedule, accumulation, bf16, checkpoints."""

import json
import math
import subprocess
import sys

import pytest
import torch
from trainers import tiny_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_lowrank
from hf_lowrank import LowRankLlamaForCausalLM
from hf_lowrank.training.diagnostics import LossSpikeDetector, SpectralDiagnosticsCallback
from hf_lowrank.training.pretrain import build_config, parse_args

TINY_RUN = [
    "--preset",
    "tiny",
    "--max_corpus_bytes",
    "250000",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "5",
    "--eval_steps",
    "20",
    "--save_steps",
    "20",
    "--sample_tokens",
    "12",
]


def make_trainer(tmp_path, tiny_data, optimizer="spectron", callbacks=None, **overrides):
    model_overrides = overrides.pop("model", {})
    settings = dict(max_steps=12, save_strategy="no", lr_scheduler_type="cosine", warmup_steps=2)
    return tiny_trainer(
        tmp_path,
        tiny_data,
        {**settings, **overrides},
        model_overrides=model_overrides,
        optimizer=optimizer,
        callbacks=callbacks,
    )


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "pretrain", "--output_dir", str(out), "--max_steps", "40", *TINY_RUN],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "validation loss" in result.stdout and "AutoModelForCausalLM.from_pretrained" in result.stdout
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_lowrank.py",
        "tokenizer.json",
        "metrics.json",
        "training_summary.json",
        "eval_results.json",
        "training_curves.png",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) or all(p.name == "training_args.bin" for p in out.glob("*.bin"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["unigram_loss"] - 0.1, metrics
    assert math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-6)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    diag = [row for row in history if "diag/update_norm_max" in row]
    assert diag and all(row["diag/update_over_lr_max"] <= 1.05 for row in diag)
    assert all(key in diag[0] for key in ("diag/sigma_up_max", "diag/sigma_down_mean", "diag/loss_spikes"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["optimizer"] == "spectron" and summary["max_steps"] == 40 and summary["train_tokens"] == 40 * 8 * 128
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LowRankLlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("import os\n", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 8
    assert tokenizer.decode(generated[0]).startswith("import os\n")  # byte-level BPE: the prompt round-trips


def test_trainer_lowers_loss_and_saves_tensor_only_optimizer_state(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, max_steps=16, save_strategy="steps", save_steps=16)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    state = torch.load(tmp_path / "checkpoint-16" / "optimizer.pt", weights_only=True)
    algorithms = {group.get("algorithm") for group in state["param_groups"]}
    assert {"spectron", "adamw"} <= algorithms
    assert state["state"], "optimizer state was not saved"


@pytest.mark.parametrize("optimizer", ["spectron", "adamw"])
def test_schedule_scales_every_group_alike(tmp_path, tiny_data, optimizer):
    trainer = make_trainer(
        tmp_path,
        tiny_data,
        optimizer=optimizer,
        max_steps=6,
        warmup_steps=3,
        learning_rate=0.02 if optimizer == "spectron" else 3e-3,
    )
    ratios = []

    class Spy(SpectralDiagnosticsCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            lrs = [g["lr"] / g["initial_lr"] for g in optimizer.param_groups]
            ratios.append(lrs)

    trainer.add_callback(Spy(every=1000))
    trainer.train()
    for step_ratios in ratios:
        assert max(step_ratios) - min(step_ratios) < 1e-12  # one schedule for all groups
    warmup = [r[0] for r in ratios[:3]]
    assert warmup == sorted(warmup) and warmup[0] < warmup[-1]  # linear warm-up, then decay
    assert ratios[-1][0] < ratios[3][0]


def test_gradient_accumulation_matches_large_batch(tmp_path, tiny_data):
    """Two micro-batches of 4 accumulate to the same Spectron step as one batch of 8 (R3's accumulation part)."""
    params = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = make_trainer(
            tmp_path / f"{batch}",
            tiny_data,
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            lr_scheduler_type="constant",
            warmup_steps=0,
        )
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_on_cpu(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, bf16=True, max_steps=4)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_spike_counter_reaches_log_history(tmp_path, tiny_data):
    detector = LossSpikeDetector(window=3, threshold=3.0, min_increase=0.5, warmup=3)
    trainer = make_trainer(
        tmp_path,
        tiny_data,
        callbacks=[SpectralDiagnosticsCallback(every=2, spike_detector=detector)],
        max_steps=8,
        logging_steps=2,
    )
    calls = []

    def plant_spike(module, args, output):  # the 6th step's loss is 5x: a spike, whatever the curve does
        calls.append(1)
        if len(calls) == 6:
            output.loss = output.loss * 5
        return output

    trainer.model.register_forward_hook(plant_spike)
    trainer.train()
    assert detector.spikes == 1  # the guard fed this detector every step's loss
    logged = [row["diag/loss_spikes"] for row in trainer.state.log_history if "diag/loss_spikes" in row]
    assert logged[-1] == 1 and logged[0] == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "huge"], "--preset must be one of"),
        (["--optimizer", "sgd"], "--optimizer must be one of"),
        (["--config_overrides", "hidden_size"], "key=value pairs"),
        (["--rank_ratio", "1.5"], "`rank_ratio` must be in (0, 1)"),
        (["--preset", "tiny", "--config_overrides", "num_attention_heads=3"], "not divisible by `num_attention_heads`"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, argv, message):
    with pytest.raises(ValueError) as error:
        model_args, *_ = parse_args(["--output_dir", str(tmp_path), *argv])
        build_config(model_args)
    assert message in str(error.value)


def test_package_exports_training_free_api():
    assert {"Spectron", "build_optimizer"} <= set(hf_lowrank.__all__)


def test_eval_max_batches_means_batches_on_every_process(tmp_path):
    """`--eval_max_batches 1` under 2 processes took one batch of blocks for both, so each rank had half a batch and
    the data check refused it with advice that could not be followed; now every rank gets its batch."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_lowrank.training.pretrain import periodic_eval_split

    blocks = Dataset.from_dict({"input_ids": [[i] * 4 for i in range(40)]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to="none")
    assert args.world_size == 1 and len(periodic_eval_split(blocks, 2, args)) == 8
    assert periodic_eval_split(blocks, None, args) is blocks

    class TwoRanks:  # what TrainingArguments reports under `torchrun --nproc_per_node 2`
        per_device_eval_batch_size, world_size = 4, 2

    assert len(periodic_eval_split(blocks, 1, TwoRanks())) == 8  # one full batch of 4 on each of the 2 ranks
    assert len(periodic_eval_split(blocks, 9, TwoRanks())) == 40  # never more than there is
    stream = blocks.to_iterable_dataset()
    assert len(list(periodic_eval_split(stream, 1, TwoRanks()))) == 8
