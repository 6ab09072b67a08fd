"""Checkpoints hold only finite tensors (R22), resume is explicit about settings (R23) and exact after a rollback
(R3, R4), malformed checkpoint files are named and skipped (R2), a full disk is reported as such. Real tiny runs."""

import json
import logging
import math
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from trainers import PoisonTrainer, tiny_trainer
from transformers import TrainerCallback

from hf_lowrank.training.arguments import OptimizerArguments
from hf_lowrank.training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    latest_complete_checkpoint,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from hf_lowrank.training.diagnostics import LossSpikeDetector
from hf_lowrank.training.guards import NonFiniteTrainingError, StepGuard


def make_trainer(output_dir, tiny_data, guard=None, poison=None, train_blocks=None, optimizer_args=None, **overrides):
    settings = dict(max_steps=6, warmup_steps=0, save_strategy="steps", save_steps=2)
    return tiny_trainer(
        output_dir,
        tiny_data,
        {**settings, **overrides},
        trainer_class=PoisonTrainer,
        train_blocks=train_blocks,
        optimizer_args=optimizer_args,
        guard=guard,
        poison=poison,
    )


def saved_tensors_finite(checkpoint) -> bool:
    weights = load_file(checkpoint / "model.safetensors")
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    tensors = list(weights.values()) + [t for s in optimizer.values() for t in s.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- R22
class OverflowingUpdate(TrainerCallback):
    """Makes the update of optimizer step ``at`` overflow: right after the optimizer ran (the guard had seen a finite
    loss and finite gradients), one weight of the factor it updated becomes inf, as an update computed in too narrow
    a type would leave it."""

    def __init__(self, at):
        self.at = at

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.up.weight[0, 0] = math.inf


def test_an_overflowing_update_is_never_saved_and_the_error_names_the_intact_checkpoint(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, save_steps=1)
    trainer.add_callback(OverflowingUpdate(at=3))
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "Step 3: the parameter" in message and "an optimizer update itself overflowed" in message
    assert f"{tmp_path / 'checkpoint-3'} was not saved" in message
    assert f"The newest complete checkpoint, {tmp_path / 'checkpoint-2'}, holds only finite values" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    for checkpoint in list_checkpoints(tmp_path):
        verify_checkpoint(checkpoint)
        assert saved_tensors_finite(checkpoint)


def test_an_overflow_between_saves_stops_at_the_next_step_with_a_true_message(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, save_steps=2)
    trainer.add_callback(OverflowingUpdate(at=3))
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith("Step 4: the parameter") and "(the last one applied was step 3)" in message
    assert "No update from these steps reached the weights" not in message  # the guard's claim would be false
    assert f"{tmp_path / 'checkpoint-2'}, holds only finite values" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert saved_tensors_finite(tmp_path / "checkpoint-2")


# ---------------------------------------------------------------------------------------------- R23
def spike_guard(window=3, threshold=3.0, action="log"):
    return StepGuard(
        spike_detector=LossSpikeDetector(window=window, threshold=threshold, min_increase=0.5, warmup=0),
        spike_action=action,
    )


@pytest.fixture(scope="module")
def four_steps(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("four")
    make_trainer(out, tiny_data, guard=spike_guard(), max_steps=4).train()
    return out


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(learning_rate=0.05), "--learning_rate 0.05 (the checkpoint's: 0.02)"),
        (dict(weight_decay=0.1), "--weight_decay 0.1 (the checkpoint's: 0.0)"),
        (dict(optimizer_args=OptimizerArguments(optimizer="spectron", adamw_learning_rate=1e-3)),
         "--adamw_learning_rate 0.001 (the checkpoint's: 0.003)"),
        (dict(optimizer_args=OptimizerArguments(optimizer="spectron", adamw_learning_rate=3e-3, ns_steps=3)),
         "--ns_steps 3 (the checkpoint's: 5)"),
    ],
)  # fmt: skip
def test_a_setting_the_checkpoint_would_replace_is_refused_at_resume(four_steps, tiny_data, tmp_path, change, flag):
    before = {p: p.stat().st_mtime_ns for p in four_steps.rglob("*")}
    trainer = make_trainer(four_steps, tiny_data, guard=spike_guard(), max_steps=6, **change)
    with pytest.raises(
        ValueError, match=r"Cannot resume from .*checkpoint-4 with " + flag.replace("(", r"\(").replace(")", r"\)")
    ):
        trainer.train(resume_from_checkpoint=True)
    assert {p: p.stat().st_mtime_ns for p in four_steps.rglob("*")} == before


def test_new_spike_settings_are_honoured_at_resume_and_recorded(four_steps, tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(four_steps / "checkpoint-4", out / "checkpoint-4")
    trainer = make_trainer(out, tiny_data, guard=spike_guard(window=5, threshold=2.0, action="skip"), max_steps=6)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    detector = trainer.guard.spike_detector
    assert (detector.window, detector.threshold, trainer.guard.spike_action) == (5, 2.0, "skip")
    assert detector.history.maxlen == 5 and detector.steps == 6  # the history came back, the settings did not
    assert "Resuming with --spike_window 5 (the checkpoint was trained with 3)" in caplog.text
    assert "Resuming with --spike_threshold 2.0 (the checkpoint was trained with 3.0)" in caplog.text
    saved = json.loads((out / "checkpoint-6" / "lowrank_trainer_state.json").read_text())
    assert saved["settings"]["spike_window"] == 5 and saved["settings"]["spike_action"] == "skip"
    assert saved["guard"]["spike_detector"]["window"] == 5


# ---------------------------------------------------------------------------------------------- R3 after rollback
def test_resume_from_a_checkpoint_saved_after_a_rollback_is_exact(tmp_path, tiny_data):
    """24 blocks in batches of 8: 3 steps per epoch. A spike at step 3 rolls back to checkpoint-2, whose batches
    3 stay consumed: checkpoint-4 is saved with the loader one step ahead, in epoch 1, and a resume from it must
    see the batches the uninterrupted run saw after it."""
    settings = dict(train_blocks=24, max_steps=7, save_steps=2, lr_scheduler_type="constant")

    def guard():
        return StepGuard(
            spike_detector=LossSpikeDetector(window=2, threshold=3.0, min_increase=0.5, warmup=0),
            spike_action="rollback",
            max_rollbacks=1,
        )

    straight = make_trainer(tmp_path / "straight", tiny_data, guard=guard(), poison={3: 30.0}, **settings)
    straight.train()
    assert straight.guard.rollbacks == 1 and straight.state.global_step == 7
    # Forwards: 1, 2, 3 (spike, rolled back to step 2), then steps 3..7 on forwards 4..8; checkpoint-4 after forward 5.
    saved = json.loads((tmp_path / "straight" / "checkpoint-4" / "lowrank_trainer_state.json").read_text())
    assert saved["data_step_offset"] == 1

    resumed = make_trainer(tmp_path / "resumed", tiny_data, guard=guard(), **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed.batch_hashes == straight.batch_hashes[5:]

    def rows(trainer):
        return [
            (r["step"], r["loss"], r["grad_norm"])
            for r in trainer.state.log_history
            if r.get("step", 0) > 4 and "loss" in r
        ]

    assert len(rows(straight)) == 3 and rows(resumed) == rows(straight)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_rollback_in_the_last_epoch_still_trains_max_steps(tmp_path, tiny_data):
    """3 steps per epoch and max_steps=9 make the stock Trainer plan 3 epochs: exactly 9 batches. A rollback leaves
    the spike's batches consumed, so the run needs a 4th epoch; without it the run would end at step 8, short of the
    max_steps the user asked for, and save that as final."""
    guard = StepGuard(
        spike_detector=LossSpikeDetector(window=2, threshold=3.0, min_increase=0.5, warmup=0),
        spike_action="rollback",
        max_rollbacks=1,
    )
    trainer = make_trainer(
        tmp_path / "run", tiny_data, guard=guard, poison={3: 30.0}, train_blocks=24, max_steps=9, save_steps=2
    )
    trainer.train()
    assert trainer.guard.rollbacks == 1
    assert trainer.state.global_step == 9 and len(trainer.batch_hashes) == 10
    assert [r["step"] for r in trainer.state.log_history if "loss" in r][-1] == 9


# ---------------------------------------------------------------------------------------------- R2: malformed files
@pytest.fixture(scope="module")
def two_checkpoints(four_steps):
    return four_steps  # checkpoint-2 and checkpoint-4, complete


def _break(checkpoint, name, content):
    path = checkpoint / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".pt"):
        torch.save(content, path)
    else:
        path.write_text(json.dumps(content))
    if name != MANIFEST_NAME:
        write_manifest(checkpoint)  # the file was saved malformed: its hash is in the manifest


@pytest.mark.parametrize(
    "name, content, message",
    [
        (MANIFEST_NAME, {"format": 1, "files": {}}, "lists no weights file"),
        (MANIFEST_NAME, {"format": 1, "files": ["model.safetensors"]}, "is malformed: it has no 'files' object"),
        (MANIFEST_NAME, {"format": 1, "files": {"model.safetensors": 12}}, "is malformed: its entry for"),
        (MANIFEST_NAME, [], "is malformed: it has no 'files' object"),
        ("trainer_state.json", [], " is malformed"),
        ("trainer_state.json", {"global_step": "4"}, " is malformed"),
        ("trainer_state.json", {"global_step": 4, "bogus": 1}, " is malformed"),
        ("lowrank_trainer_state.json", {"guard": {}}, " is malformed"),
        ("lowrank_trainer_state.json", b"{not json", " is malformed"),
        ("scheduler.pt", [1, 2], " is malformed"),
    ],
)
def test_malformed_checkpoint_files_are_named_and_resume_falls_back(
    two_checkpoints, tiny_data, tmp_path, caplog, name, content, message
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoint-4"
    _break(newest, name, content)
    with pytest.raises(CheckpointError, match=re.escape(str(newest / name)) + ".*" + re.escape(message)):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert str(newest / name) in caplog.text
    # A run resumes from checkpoint-2 and trains on.
    trainer = make_trainer(out, tiny_data, guard=spike_guard(), max_steps=4, save_steps=10)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4


# ---------------------------------------------------------------------------------------------- disk full
def test_a_full_disk_is_reported_as_such_and_leaves_no_partial_save(tmp_path, tiny_data):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 1 MiB: the weights of the tiny model (~0.5 MB) fit, the optimizer state (torch.save) does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        trainer = make_trainer(disk, tiny_data, max_steps=2, save_steps=2)
        with pytest.raises(OSError, match=r"No space left on device while saving .*checkpoint-2") as caught:
            trainer.train()
        assert "The partial save was removed; no complete checkpoint exists" in str(caught.value)
        assert not any(p.name.startswith((".tmp-", "checkpoint-")) for p in disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: the Trainer may still hold a handle


def test_pretrain_resume_refuses_a_new_learning_rate_and_honours_new_spike_settings(tmp_path):
    from hf_lowrank.training.pretrain import parse_args, run

    tiny = [
        "--output_dir", str(tmp_path / "run"), "--preset", "tiny", "--max_corpus_bytes", "150000",
        "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--sample_tokens", "2",
        "--eval_max_batches", "1", "--disable_tqdm", "true", "--save_steps", "2", "--spike_window", "3",
    ]  # fmt: skip
    run(*parse_args([*tiny, "--max_steps", "2"]))
    with pytest.raises(ValueError, match=r"with --learning_rate 0\.05 \(the checkpoint's: 0\.02\)"):
        run(*parse_args([*tiny, "--max_steps", "4", "--learning_rate", "0.05"]))
    run(*parse_args([*tiny, "--max_steps", "4", "--spike_window", "7"]))
    saved = json.loads((tmp_path / "run" / "checkpoint-4" / "lowrank_trainer_state.json").read_text())
    assert saved["settings"]["spike_window"] == saved["guard"]["spike_detector"]["window"] == 7
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["learning_rate"] == saved["settings"]["learning_rate"] == 0.02
