"""The output folder of a run (RELIABILITY R19-R21): re-running a finished command changes nothing, a kill after
the last step resumes to exactly max_steps, one run per folder, and no foreign folder is overwritten. Real processes,
real files, tiny runs."""

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fork_ranks
from safetensors.torch import load_file

from hf_lowrank.training import run_dir
from hf_lowrank.training.checkpointing import checkpoint_step, list_checkpoints
from hf_lowrank.training.pretrain import parse_args, run
from hf_lowrank.training.run_dir import COMPLETE_NAME, LOCK_NAME, OutputDirInUseError, RunLock, open_run_dir

TINY = [
    "--preset", "tiny", "--max_corpus_bytes", "150000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    "--eval_strategy", "no", "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
    "--save_steps", "2", "--max_steps", "4",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(out, *extra) -> list[str]:
    return [sys.executable, "-m", "hf_lowrank.cli", "pretrain", "--output_dir", str(out), *TINY, *extra]


def fingerprint(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def logged_steps(folder: Path) -> list[int]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [row["step"] for row in history if "loss" in row]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4); tests compare with it or copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(*parse_args(["--output_dir", str(out), *TINY]))
    return out


# ---------------------------------------------------------------------------------------------- R19
@pytest.mark.slow
def test_rerunning_a_finished_command_changes_nothing_and_says_so(finished_run, tmp_path):
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = fingerprint(out)
    assert (out / COMPLETE_NAME).is_file() and (out / LOCK_NAME).read_text() == ""  # released cleanly

    result = subprocess.run(cli(out), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"The run in {out} is complete (step 4); nothing was changed" in result.stdout
    assert fingerprint(out) == before  # no file changed, none added or removed (the stock resume trained step 5)

    again = run(*parse_args(["--output_dir", str(out), *TINY]))  # in-process callers get the saved metrics
    assert again["already_complete"]["global_step"] == 4
    assert again["eval_loss"] == json.loads((out / "metrics.json").read_text())["eval_loss"]
    assert fingerprint(out) == before


def _killed_at_the_end(out, where):
    """A real run that SIGKILLs itself after its last step: in the middle of writing the final model (a torn
    model.safetensors) or during the final evaluation."""
    import transformers

    from hf_lowrank.training.trainer import LowRankTrainer

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    save_model = LowRankTrainer.save_model

    def torn_save(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if not _internal_call:  # the final save, not a checkpoint's
            path = Path(output_dir) / "model.safetensors"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    def killed_evaluate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "final_save":
        LowRankTrainer.save_model = torn_save
    else:
        LowRankTrainer.evaluate = killed_evaluate
    run(*parse_args(["--output_dir", str(out), *TINY]))


@pytest.mark.parametrize("where", ["final_save", "final_evaluation"])
def test_a_kill_after_the_last_step_resumes_to_exactly_max_steps(finished_run, tmp_path, where):
    out = tmp_path / "run"
    process = multiprocessing.get_context("fork").Process(target=_killed_at_the_end, args=(out, where))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2, 4] and not (out / COMPLETE_NAME).exists()

    run(*parse_args(["--output_dir", str(out), *TINY]))  # the documented resume: the same command again
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2, 4]  # no checkpoint-5; checkpoint-4 kept
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert logged_steps(out) == [1, 2, 3, 4]
    final, reference = weights(out), weights(finished_run)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # the uninterrupted weights, bitwise
    assert json.loads((out / COMPLETE_NAME).read_text())["global_step"] == 4


def test_a_raised_max_steps_trains_further(finished_run, tmp_path):
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    run(*parse_args(["--output_dir", str(out), *TINY, "--max_steps", "6"]))
    assert json.loads((out / COMPLETE_NAME).read_text())["global_step"] == 6
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- R20
def _wait_for_holder(lock: Path, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lock.is_file() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{lock} was never written")


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    first = subprocess.Popen(
        cli(out, "--max_steps", "100000", "--save_steps", "100000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        holder = _wait_for_holder(out / LOCK_NAME)
        assert holder["pid"] == first.pid and "pretrain" in holder["command"]
        before = fingerprint(out)
        started = time.time()
        with pytest.raises(OutputDirInUseError, match=rf"is in use by another run \(process {first.pid} on host "):
            run(*parse_args(["--output_dir", str(out), *TINY]))
        assert time.time() - started < 30  # refused at once, not after data preparation or training
        assert first.poll() is None  # the first run goes on
        assert all(fingerprint(out).get(p) == d for p, d in before.items() if p != LOCK_NAME)
    finally:
        first.kill()  # SIGKILL: the lock file still names it
        first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid

    with caplog.at_level(logging.WARNING, logger="hf_lowrank.training.run_dir"):
        run(*parse_args(["--output_dir", str(out), *TINY, "--max_steps", "2"]))
    assert f"Taking over the stale lock {out / LOCK_NAME} of process {first.pid}" in caplog.text
    assert "no longer running" in caplog.text
    assert json.loads((out / COMPLETE_NAME).read_text())["global_step"] == 2


def test_without_flock_a_live_holder_on_this_host_is_still_refused(tmp_path, monkeypatch):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": sleeper.pid, "host": os.uname().nodename, "command": "other", "started": time.time()}
        (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
        with pytest.raises(OutputDirInUseError, match=f"process {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the holder is dead now: taken over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def _rank(rank, out, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out.parent / 'rendezvous'}", rank=rank, world_size=2)
    args = SimpleNamespace(max_steps=4, num_train_epochs=3.0)
    try:
        with open_run_dir(out, args) as completed:
            results.put((rank, "entered", completed, json.loads((out / LOCK_NAME).read_text())["pid"]))
            dist.barrier()
    except OutputDirInUseError as error:
        results.put((rank, "refused", str(error), None))
    dist.destroy_process_group()


@pytest.mark.parametrize("held", [False, True])
def test_multi_process_runs_lock_once_and_share_the_outcome(tmp_path, held):
    """Two gloo ranks: only rank 0 locks (the lock names it); when the folder is taken, both ranks are refused
    instead of rank 1 training alone into a hang."""
    out = tmp_path / "run"
    holder = RunLock(out)
    if held:
        holder.acquire()  # another run, in this process
    outcomes, pids = fork_ranks(_rank, out)
    outcome = sorted(outcomes)
    holder.release()
    if held:
        assert [o[:2] for o in outcome] == [(0, "refused"), (1, "refused")]
        assert all(f"process {os.getpid()}" in o[2] for o in outcome)
    else:
        assert [o[:3] for o in outcome] == [(0, "entered", None), (1, "entered", None)]
        assert outcome[0][3] == outcome[1][3] == pids[0]  # locked once, by rank 0


# ---------------------------------------------------------------------------------------------- R21
def test_a_foreign_folder_is_refused_unless_overwrite_is_asked(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(llama)
    before = fingerprint(llama)
    with pytest.raises(ValueError, match=r"is a non-empty folder \(config.json, .*not a run of hf-lowrank.*"
                       r"--overwrite_output_dir"):  # fmt: skip
        run(*parse_args(["--output_dir", str(llama), *TINY]))
    assert fingerprint(llama) == before  # nothing written, nothing lost

    run(*parse_args(["--output_dir", str(llama), *TINY, "--max_steps", "2", "--overwrite_output_dir"]))
    assert json.loads((llama / COMPLETE_NAME).read_text())["global_step"] == 2


def test_an_empty_output_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--output_dir is empty"):
        run(*parse_args(["--output_dir", "", *TINY]))
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
