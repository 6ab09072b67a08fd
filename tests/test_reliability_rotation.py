"""Rotation keeps what resume needs (RELIABILITY R28): `--save_total_limit` never deletes the newest checkpoint that
verifies, never keeps one that does not in its place, never deletes a preemption (SIGTERM) checkpoint, and the exit
message of a preempted run names a checkpoint only if it exists and verifies. Real runs, real files, flipped bytes."""

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainers import tiny_trainer

from hf_lowrank.training.checkpointing import (
    CheckpointError,
    checkpoint_step,
    commit_checkpoint,
    latest_complete_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
    verify_checkpoint,
)
from hf_lowrank.training.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted, preemption_message
from hf_lowrank.training.pretrain import parse_args, run

TINY = [
    "--preset", "tiny", "--max_corpus_bytes", "150000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    "--eval_strategy", "no", "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
    "--save_steps", "2",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flip_byte(path: Path) -> None:
    """Corrupt one byte in the middle of ``path``, size unchanged (a bad disk, a bad copy). The modification time is
    moved a second on, as a later write would have it: a flip within the clock tick of the save would keep the time,
    and a process that verified the file itself trusts an unchanged size and time (a new process hashes anyway)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    times = path.stat()
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))


def steps(run_dir: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(run_dir)]


def logged_steps(folder: Path) -> list[int]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [row["step"] for row in history if "loss" in row]


def fake_checkpoint(run_dir: Path, step: int, corrupt: bool = False) -> Path:
    """A complete checkpoint-``step`` (weights file and manifest) saved the crash-safe way; ``corrupt``: then one
    byte of its weights flipped."""
    staging = run_dir / f".tmp-checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(bytes(range(256)) * step)
    commit_checkpoint(staging, run_dir / f"checkpoint-{step}")
    if corrupt:
        flip_byte(run_dir / f"checkpoint-{step}" / "model.safetensors")
    return run_dir / f"checkpoint-{step}"


# ---------------------------------------------------------------------------------------------- rotation
def test_rotation_keeps_the_newest_checkpoints_that_verify(tmp_path, caplog):
    # The reported case: checkpoint-8 corrupt, a re-run saved checkpoint-4. The stock-like rotation kept 8 (it has a
    # manifest, and the highest step) and deleted 4; the run was then left with nothing to resume from.
    for step, corrupt in ((2, False), (4, False), (8, True)):
        fake_checkpoint(tmp_path / "newer", step, corrupt)
    with caplog.at_level(logging.WARNING):
        rotate_checkpoints(tmp_path / "newer", save_total_limit=1)
    assert steps(tmp_path / "newer") == [4, 8]  # 4 kept; the corrupt 8 left alone (newer: replaced when re-saved)
    assert latest_complete_checkpoint(tmp_path / "newer") == str(tmp_path / "newer" / "checkpoint-4")
    assert "checkpoint-8/model.safetensors does not match its sha256" in caplog.text

    # A corrupt checkpoint does not count toward the limit: the two newest that verify stay, and the corrupt one,
    # older than the newest that verifies, goes (resume would never pick it).
    for step, corrupt in ((2, False), (4, True), (6, False)):
        fake_checkpoint(tmp_path / "between", step, corrupt)
    rotate_checkpoints(tmp_path / "between", save_total_limit=2)
    assert steps(tmp_path / "between") == [2, 6]

    # Nothing verifies: nothing is deleted.
    for step in (2, 4):
        fake_checkpoint(tmp_path / "none", step, corrupt=True)
    rotate_checkpoints(tmp_path / "none", save_total_limit=1)
    assert steps(tmp_path / "none") == [2, 4]


def test_a_run_after_a_corrupt_newest_checkpoint_keeps_its_own_checkpoints(tmp_path, tiny_data):
    settings = dict(save_strategy="steps", save_steps=2, save_total_limit=1)
    tiny_trainer(tmp_path, tiny_data, {**settings, "max_steps": 8}).train()
    assert steps(tmp_path) == [8]
    flip_byte(tmp_path / "checkpoint-8" / "model.safetensors")
    with pytest.raises(CheckpointError):
        verify_checkpoint(tmp_path / "checkpoint-8")

    # What a re-run does when its only checkpoint is corrupt: it starts over, saving checkpoints 2 and 4.
    tiny_trainer(tmp_path, tiny_data, {**settings, "max_steps": 4}).train()
    assert steps(tmp_path) == [4, 8]  # rotation used to keep the corrupt 8 and delete each of them
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")  # the next resume has a start


def test_the_preemption_message_names_only_a_checkpoint_that_verifies(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 3, corrupt=True)  # the checkpoint saved at the SIGTERM does not verify
    message = preemption_message(out, 3)
    assert "Stopped by SIGTERM at step 3, but its checkpoint cannot be resumed from" in message
    assert "checkpoint-3/model.safetensors does not match its sha256" in message
    newest = out / "checkpoint-2"
    assert message.endswith(f"The newest complete checkpoint is {newest}. Re-run the same command to resume from it.")
    assert "checkpoint-3 is complete" not in message

    flip_byte(out / "checkpoint-2" / "model.safetensors")
    message = preemption_message(out, 3)
    assert message.endswith(f"No complete checkpoint is left in {out}: a re-run starts from step 0.")
    assert "is complete" not in message and "checkpoint-2" not in message

    # The saved one verifies but a newer one does too (a run resumed from an older checkpoint): a plain re-run would
    # pick the newer one, so the message names the flag that resumes from the saved one.
    fake_checkpoint(tmp_path / "older", 3)
    fake_checkpoint(tmp_path / "older", 6)
    message = preemption_message(tmp_path / "older", 3)
    checkpoint = tmp_path / "older" / "checkpoint-3"
    assert message == (
        f"Stopped by SIGTERM at step 3: {checkpoint} is complete. Re-run with --resume_from_checkpoint {checkpoint} "
        "to resume from it."
    )
    assert preemption_message(tmp_path / "older", 6).endswith("Re-run the same command to resume from it.")
    assert "--resume_from_checkpoint" in preemption_message(tmp_path / "older", 6, explicit_resume=True)


# ---------------------------------------------------------------------------------------------- real processes
def _pretrain_stopped(out, argv, step, how, results):
    """`hf-lowrank pretrain`'s `run` in a forked process that, at the start of step ``step``, sends itself ``how``
    (SIGKILL: a crash; SIGTERM: a scheduler's preemption, handled by the run). Puts the preemption message on
    ``results``."""
    import transformers

    from hf_lowrank.training.trainer import LowRankTrainer

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    training_step = LowRankTrainer.training_step

    def stopped(self, *args, **kwargs):
        if self.state.global_step == step - 1 and self._micro_steps == 0:
            os.kill(os.getpid(), how)
        return training_step(self, *args, **kwargs)

    LowRankTrainer.training_step = stopped
    try:
        run(*parse_args(["--output_dir", str(out), *argv]))
    except TrainingPreempted as stop:
        results.put(str(stop))


def stop_at(out, argv, step, how) -> str | None:
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    process = fork.Process(target=_pretrain_stopped, args=(out, argv, step, how, results))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == (-signal.SIGKILL if how == signal.SIGKILL else 0), process.exitcode
    return None if results.empty() else results.get(timeout=10)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_never_costs_the_rerun_its_own(tmp_path, caplog):
    """The reported sequence: `--save_total_limit 1`, killed after checkpoint-20, one byte of it flipped; the re-run
    starts over. Its checkpoint-2 survives a kill, and its SIGTERM checkpoint survives rotation, is named by the exit
    message, and is what the next run resumes from."""
    out, argv = tmp_path / "run", [*TINY, "--save_total_limit", "1", "--max_steps", "24"]
    stop_at(out, argv, 21, signal.SIGKILL)
    assert steps(out) == [20]
    flip_byte(out / "checkpoint-20" / "model.safetensors")

    stop_at(out, argv, 3, signal.SIGKILL)  # the re-run starts from step 0 and is killed after its first save
    assert steps(out) == [2, 20]
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")

    job = subprocess.Popen(
        [sys.executable, "-m", "hf_lowrank.cli", "pretrain", "--output_dir", str(out), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        for line in job.stdout:
            if "'loss'" in line:  # training from checkpoint-2 is under way
                job.send_signal(signal.SIGTERM)
                break
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert f"Resuming from the newest complete checkpoint {out / 'checkpoint-2'}" in stderr
    found = re.search(r"Stopped by SIGTERM at step (\d+): (\S+) is complete\. Re-run the same command", stderr)
    assert found, stderr[-3000:]
    stopped = int(found.group(1))
    assert found.group(2) == str(out / f"checkpoint-{stopped}") and 3 <= stopped < 20
    assert steps(out) == [stopped, 20]  # the preemption checkpoint was kept, the corrupt newer one left alone
    verify_checkpoint(out / f"checkpoint-{stopped}")

    with caplog.at_level(logging.INFO, logger="hf_lowrank"):
        run(*parse_args(["--output_dir", str(out), *argv]))  # the requeued job
    assert f"Resuming from the newest complete checkpoint {out / f'checkpoint-{stopped}'}" in caplog.text
    assert logged_steps(out) == list(range(1, 25))  # every step once: nothing was lost or redone
    assert steps(out) == [24]  # the corrupt checkpoint-20 was replaced when step 20 was saved again, then rotated


@pytest.mark.slow
def test_a_preemption_checkpoint_survives_rotation_after_resuming_from_an_older_one(tmp_path):
    out = tmp_path / "run"
    run(*parse_args(["--output_dir", str(out), *TINY, "--save_total_limit", "3", "--max_steps", "6"]))
    assert steps(out) == [2, 4, 6]

    # Resumed from checkpoint-2 by hand, then SIGTERM in step 3: checkpoint-3 is saved while the newer checkpoint-6
    # verifies and the limit is 1. Rotation used to delete the SIGTERM checkpoint the moment it was written.
    argv = [*TINY, "--save_total_limit", "1", "--max_steps", "8", "--resume_from_checkpoint", str(out / "checkpoint-2")]
    message = stop_at(out, argv, 3, signal.SIGTERM)
    checkpoint = out / "checkpoint-3"
    assert steps(out) == [3, 6]
    verify_checkpoint(checkpoint)
    assert message == (
        f"Stopped by SIGTERM at step 3: {checkpoint} is complete. Re-run with --resume_from_checkpoint {checkpoint} "
        "to resume from it."
    )

    argv[-1] = str(checkpoint)  # what the message says to do
    run(*parse_args(["--output_dir", str(out), *argv]))
    assert logged_steps(out) == list(range(1, 9))
