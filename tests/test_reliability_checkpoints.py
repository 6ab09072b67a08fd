"""Crash-safe checkpoints and safe loading (RELIABILITY R1, R2, R7), with tiny real training runs."""

import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainers import tiny_trainer
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import get_last_checkpoint

from hf_lowrank.training.checkpointing import (
    CRASH_ENV,
    MANIFEST_NAME,
    SAVE_STAGES,
    CheckpointError,
    checkpoint_step,
    commit_checkpoint,
    latest_complete_checkpoint,
    load_state_file,
    remove_leftovers,
    rotate_checkpoints,
    verify_checkpoint,
    write_manifest,
)

PRETRAIN = [
    "--preset", "tiny", "--max_corpus_bytes", "250000", "--per_device_train_batch_size", "4",
    "--save_steps", "2", "--save_total_limit", "2", "--logging_steps", "1", "--eval_strategy", "no",
    "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
]  # fmt: skip


def make_trainer(output_dir, tiny_data, optimizer="spectron", **overrides):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    return tiny_trainer(output_dir, tiny_data, {**settings, **overrides}, optimizer=optimizer)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """A run folder with complete checkpoint-2 and checkpoint-4 (4 Spectron steps); tests work on copies."""
    out = tmp_path_factory.mktemp("trained") / "run"
    make_trainer(out, tiny_data).train()
    return out


def copy_run(trained_run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained_run, tmp_path / "run"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------------------- R1
def _pretrain_child(output_dir, max_steps, stage):
    """A real training process (forked, so it skips the imports): `hf-lowrank pretrain`'s `run`, which kills
    itself with SIGKILL when a checkpoint save reaches `stage`."""
    import transformers

    from hf_lowrank.training.pretrain import parse_args, run

    os.environ[CRASH_ENV] = stage
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    run(*parse_args(["--output_dir", str(output_dir), "--max_steps", str(max_steps), *PRETRAIN]))


@pytest.mark.slow
def test_killed_at_every_save_stage_resumes_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    fork = multiprocessing.get_context("fork")
    newest = 0  # step of the newest complete checkpoint
    for stage in ("none", *SAVE_STAGES):
        # Each process resumes from the newest complete checkpoint and crashes in its first save, two steps on.
        process = fork.Process(target=_pretrain_child, args=(out, newest + 2, stage))
        process.start()
        process.join(timeout=180)
        if stage == "none":  # a first, complete run
            assert process.exitcode == 0
            newest = 2
            continue
        assert process.exitcode == -9, (stage, process.exitcode)  # SIGKILL
        if SAVE_STAGES.index(stage) >= SAVE_STAGES.index("manifest"):
            newest += 2  # the manifest was written: that save is complete
        found = latest_complete_checkpoint(out)
        assert found is not None and checkpoint_step(found) == newest, (stage, found)
        verify_checkpoint(found)
        if stage == "rename":  # checkpoint-4 exists without its manifest: the stock Trainer would resume from it
            assert checkpoint_step(get_last_checkpoint(str(out))) == newest + 2

    # The last resume goes through the real command line and finishes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: ""}
    command = [sys.executable, "-m", "hf_lowrank.cli", "pretrain", "--output_dir", str(out), "--max_steps", "10"]
    result = subprocess.run([*command, *PRETRAIN], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from the newest complete checkpoint {out / f'checkpoint-{newest}'}" in result.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 11))  # every resume continued
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-10", "checkpoint-8"]
    for checkpoint in ("checkpoint-8", "checkpoint-10"):
        verify_checkpoint(out / checkpoint)


def _fake_checkpoint(run_dir, step, complete=True):
    staging = run_dir / f"staging-{step}"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"x" * step)
    if complete:
        commit_checkpoint(staging, run_dir / f"checkpoint-{step}")
    else:
        staging.rename(run_dir / f"checkpoint-{step}")


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    for step, complete in ((1, False), (2, True), (3, True), (4, True), (5, False)):
        _fake_checkpoint(tmp_path, step, complete)
    rotate_checkpoints(tmp_path, save_total_limit=1, keep={str(tmp_path / "checkpoint-2")})
    # The newest complete (4) and the kept one (2) stay; the newer incomplete 5 is left alone (never resumed
    # from); the older incomplete 1 and the surplus complete 3 go.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


def test_an_interrupted_replacement_puts_the_old_checkpoint_back(tmp_path):
    """Saving a step that already has a checkpoint (after resuming from an older one) moves the old folder to
    .trash-checkpoint-N until the new one is complete. Killed in between, the old one comes back."""
    _fake_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-4").rename(tmp_path / ".trash-checkpoint-4")
    _fake_checkpoint(tmp_path, 4, complete=False)  # the new save, renamed but without its manifest
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"new")
    _fake_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint-2").rename(tmp_path / ".trash-checkpoint-2")  # rotation killed mid-delete: kept
    _fake_checkpoint(tmp_path, 6)
    (tmp_path / ".tmp-checkpoint-8").mkdir()  # ...and a save killed while writing
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    verify_checkpoint(tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes() == b"x" * 4


# ---------------------------------------------------------------------------------------------- R2
def test_torn_files_are_named_and_auto_resume_falls_back(trained_run, tmp_path, tiny_data, caplog):
    out = copy_run(trained_run, tmp_path)
    newest = out / "checkpoint-4"
    truncate(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint-4/model\.safetensors is torn"):
        make_trainer(out, tiny_data).train(resume_from_checkpoint=str(newest))

    # Without a manifest (a stock Trainer's checkpoint) the loaders name the torn file themselves.
    (newest / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-4/model\.safetensors"):
        make_trainer(out, tiny_data).train(resume_from_checkpoint=str(newest))
    shutil.copy(out / "checkpoint-2" / "model.safetensors", newest)
    truncate(newest / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-4/optimizer\.pt"):
        load_state_file(newest / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-4/optimizer\.pt"):
        make_trainer(out, tiny_data).train(resume_from_checkpoint=str(newest))

    # Auto-resume: a torn newest checkpoint (manifest intact) is skipped with a warning naming the file.
    out = copy_run(trained_run, tmp_path / "again")
    truncate(out / "checkpoint-4" / "optimizer.pt")
    trainer = make_trainer(out, tiny_data, max_steps=6)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "checkpoint-4/optimizer.pt is torn" in caplog.text
    assert [row["step"] for row in trainer.state.log_history if "loss" in row] == [1, 2, 3, 4, 5, 6]
    verify_checkpoint(out / "checkpoint-4")  # saved again, complete


# ---------------------------------------------------------------------------------------------- R7
class _Payload:
    """Pickles as a call to `Path.touch(marker)`: loading it with plain pickle creates the marker file."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_pickle_payload_in_a_state_file_is_refused_and_never_runs(trained_run, tmp_path, tiny_data, caplog):
    out = copy_run(trained_run, tmp_path)
    checkpoint, marker = out / "checkpoint-4", tmp_path / "payload-ran"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, checkpoint / "optimizer.pt")

    with caplog.at_level(logging.WARNING):  # the manifest no longer matches: auto-resume skips the checkpoint
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert "checkpoint-4/optimizer.pt" in caplog.text  # torn or tampered: its size and hash changed

    write_manifest(checkpoint)  # an attacker rewrites the manifest too: weights_only is the line of defence
    with pytest.raises(CheckpointError, match=r"Refused to load .*checkpoint-4/optimizer\.pt.*Nothing from it was run"):
        make_trainer(out, tiny_data, max_steps=6).train(resume_from_checkpoint=True)
    assert not marker.exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()


def test_weights_are_safetensors_and_state_files_load_weights_only(trained_run, tmp_path, tiny_data):
    checkpoint = trained_run / "checkpoint-4"
    assert load_file(checkpoint / "model.safetensors")
    json.loads((checkpoint / "trainer_state.json").read_text())
    json.loads((checkpoint / "lowrank_trainer_state.json").read_text())
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        with safe_globals():  # numpy's RNG state types, allow-listed as transformers does
            torch.load(checkpoint / name, weights_only=True)
    # Pickled weights are refused rather than unpickled.
    out = copy_run(trained_run, tmp_path)
    pickled = out / "checkpoint-4"
    (pickled / MANIFEST_NAME).unlink()
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only safetensors weights are loaded"):
        make_trainer(out, tiny_data).train(resume_from_checkpoint=str(pickled))
