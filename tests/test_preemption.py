"""Preemption (RELIABILITY R24): SIGTERM saves a checkpoint at the next step boundary and exits cleanly; re-running
the command resumes from it and ends bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import fork_ranks
from safetensors.torch import load_file

from hf_lowrank.training.checkpointing import checkpoint_step, latest_complete_checkpoint, list_checkpoints
from hf_lowrank.training.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from hf_lowrank.training.pretrain import parse_args, run
from hf_lowrank.training.run_dir import COMPLETE_NAME, LOCK_NAME

STEPS = 60
TINY = [
    "--preset", "tiny", "--max_corpus_bytes", "150000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    "--eval_strategy", "no", "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
    "--max_steps", str(STEPS), "--save_steps", "1000",
]  # fmt: skip


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run(*parse_args(["--output_dir", str(reference), *TINY]))

    out = tmp_path / "run"
    command = [sys.executable, "-m", "hf_lowrank.cli", "pretrain", "--output_dir", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in job.stdout:  # the Trainer prints each step's log line: training is under way
            if "'loss'" in line:
                job.send_signal(signal.SIGTERM)  # what a scheduler sends before killing the job
                break
        stdout, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]

    # A complete checkpoint at the step it stopped, before the end; no final save, evaluation or completion mark.
    stopped = checkpoint_step(latest_complete_checkpoint(out))
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [stopped]
    assert 1 <= stopped < STEPS
    assert f"Stopped by SIGTERM at step {stopped}: {out}/checkpoint-{stopped} is complete" in stderr
    assert not (out / "model.safetensors").exists() and not (out / COMPLETE_NAME).exists()
    assert (out / LOCK_NAME).read_text() == ""  # released on the way out

    run(*parse_args(["--output_dir", str(out), *TINY]))  # the requeued job: the same command
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in history if "loss" in row] == list(range(1, STEPS + 1))
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bitwise the uninterrupted run
    losses = {r["step"]: r["loss"] for r in history if "loss" in r}
    ref_history = json.loads((reference / "trainer_state.json").read_text())["log_history"]
    assert losses == {r["step"]: r["loss"] for r in ref_history if "loss" in r}


def _rank(rank, rendezvous, signalled, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    callback = PreemptionCallback()
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    decisions = []
    for step in range(3):
        if rank == signalled and step == 1:
            callback.received = True  # only this rank got the signal, at step 1
        decisions.append(callback.stop_requested(args))
    results.put((rank, decisions))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [0, 1])
def test_every_rank_stops_at_the_same_step(tmp_path, signalled):
    outcomes, _ = fork_ranks(_rank, tmp_path / "rendezvous", signalled)
    decisions = dict(outcomes)
    assert decisions == {0: [False, True, True], 1: [False, True, True]}
