"""`hf-lowrank finetune` is as safe as `pretrain` (RELIABILITY R19, R20, R21, R31): a killed run resumes from its
newest complete checkpoint, a second run in the same folder is refused, a foreign folder is refused, and a torn
checkpoint is one line and exit status 2. Real processes, real files, tiny runs."""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main
from hf_lowrank.training.checkpointing import (
    MANIFEST_NAME,
    checkpoint_step,
    latest_complete_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from hf_lowrank.training.run_dir import COMPLETE_NAME, LOCK_NAME, RunLock

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_tokenizer):
    """A tiny factorized model with its tokenizer, saved as `hf-lowrank pretrain` would."""
    folder = tmp_path_factory.mktemp("base")
    tiny_tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = preset_config("tiny", eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    LowRankLlamaForCausalLM(config).save_pretrained(folder)
    return folder


def finetune_args(base_model, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(base_model), "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2",
        "--learning_rate", "5e-3", "--per_device_train_batch_size", "4", "--block_size", "64",
        "--max_corpus_bytes", "200000", "--use_cpu", "--report_to", "none", "--logging_steps", "1", "--seed", "0",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def steps(out: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(out)]


def logged_steps(checkpoint: Path) -> list[int]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [row["step"] for row in history if "loss" in row]


def fingerprint(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]  # after the data preparation's progress bars


@pytest.fixture(scope="module")
def finetuned(base_model, tmp_path_factory):
    """A finished 4-step fine-tuning run with checkpoints at steps 2 and 4; tests work on copies."""
    out = tmp_path_factory.mktemp("finetuned") / "run"
    assert main(["finetune", *finetune_args(base_model, out, "--max_steps", "4")]) == 0
    return out


# ---------------------------------------------------------------------------------------------- R19
def _finetune_killed_in_step(argv, step):
    """`hf-lowrank finetune` in a forked process that SIGKILLs itself at the start of step ``step``."""
    import transformers

    from hf_lowrank.training.trainer import LowRankTrainer

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    training_step = LowRankTrainer.training_step

    def killed(self, *args, **kwargs):
        if self.state.global_step == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return training_step(self, *args, **kwargs)

    LowRankTrainer.training_step = killed
    main(["finetune", *argv])


@pytest.mark.slow
def test_a_killed_finetune_resumes_from_its_newest_checkpoint(base_model, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(["finetune", *finetune_args(base_model, reference)]) == 0

    out = tmp_path / "run"
    process = multiprocessing.get_context("fork").Process(
        target=_finetune_killed_in_step, args=(finetune_args(base_model, out), 5)
    )
    process.start()
    process.join(timeout=300)
    assert process.exitcode == -signal.SIGKILL  # a finetune that saves its checkpoints through LowRankTrainer
    assert steps(out) == [2, 4] and not (out / COMPLETE_NAME).exists()
    for checkpoint in list_checkpoints(out):
        verify_checkpoint(checkpoint)  # atomic saves with a manifest

    # Another learning rate would mix two runs in one folder: refused, nothing changed.
    capsys.readouterr()
    assert main(["finetune", *finetune_args(base_model, out, "--learning_rate", "1e-3")]) == 2
    assert error_line(capsys).startswith(f"hf-lowrank finetune: error: Cannot resume from {out / 'checkpoint-4'}")
    assert steps(out) == [2, 4]

    assert main(["finetune", *finetune_args(base_model, out)]) == 0  # the same command again: resumes
    assert logged_steps(out / "checkpoint-6") == [1, 2, 3, 4, 5, 6]  # steps 1-4 were not trained again
    final, expected = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bitwise the uninterrupted run's adapter

    before = fingerprint(out)
    capsys.readouterr()
    assert main(["finetune", *finetune_args(base_model, out)]) == 0  # and once more: complete, nothing changes
    assert f"The run in {out} is complete (step 6); nothing was changed" in capsys.readouterr().out
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------- R24
@pytest.mark.slow
def test_sigterm_checkpoints_the_finetune_and_the_same_command_resumes_bitwise(
    base_model, tmp_path, caplog, monkeypatch
):
    from hf_lowrank.training.preemption import PREEMPTED_EXIT_CODE
    from hf_lowrank.training.trainer import LowRankTrainer

    reference = tmp_path / "reference"
    assert main(["finetune", *finetune_args(base_model, reference)]) == 0

    training_step = LowRankTrainer.training_step

    def signalled(self, *args, **kwargs):
        if self.state.global_step == 2:  # a real SIGTERM, delivered to this process during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, *args, **kwargs)

    out = tmp_path / "run"
    argv, handler = finetune_args(base_model, out), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(LowRankTrainer, "training_step", signalled)
        assert main(["finetune", *argv]) == PREEMPTED_EXIT_CODE
    # Saved at the step in progress (--save_steps 2 would not have); no adapter, no completion mark.
    assert steps(out) == [2, 3] and not (out / COMPLETE_NAME).exists()
    assert not (out / "adapter_model.safetensors").exists()
    verify_checkpoint(out / "checkpoint-3")
    assert f"Stopped by SIGTERM at step 3: {out / 'checkpoint-3'} is complete. Re-run the same command" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler is gone with the run

    assert main(["finetune", *argv]) == 0  # the requeued job: the same command
    assert logged_steps(out / "checkpoint-6") == [1, 2, 3, 4, 5, 6]
    final, expected = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # bitwise the uninterrupted run's adapter


# ---------------------------------------------------------------------------------------------- R20
def _wait_for_holder(lock: Path, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lock.is_file() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{lock} was never written")


@pytest.mark.slow
def test_a_second_finetune_in_the_same_folder_is_refused(base_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = finetune_args(base_model, out, "--max_steps", "100000", "--save_steps", "100000")
    first = subprocess.Popen(
        [sys.executable, "-m", "hf_lowrank.cli", "finetune", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        holder = _wait_for_holder(out / LOCK_NAME)
        assert holder["pid"] == first.pid and "finetune" in holder["command"]
        before = fingerprint(out)
        capsys.readouterr()
        assert main(["finetune", *finetune_args(base_model, out, "--learning_rate", "1e-3")]) == 1
        assert error_line(capsys).startswith(
            f"hf-lowrank finetune: error: {out} is in use by another run (process {first.pid} on host "
        )
        assert first.poll() is None  # the first run goes on
        assert fingerprint(out) == before
    finally:
        first.kill()
        first.wait()


def test_a_locked_folder_is_refused_at_once(base_model, tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunLock(out)
    holder.acquire()  # another run, here in this process
    try:
        started = time.time()
        assert main(["finetune", *finetune_args(base_model, out)]) == 1
        assert time.time() - started < 10  # before loading the model or the data
        assert error_line(capsys).startswith(f"hf-lowrank finetune: error: {out} is in use by another run")
    finally:
        holder.release()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ---------------------------------------------------------------------------------------------- R21
def test_a_foreign_folder_is_refused(base_model, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["finetune", *finetune_args(base_model, foreign)]) == 2
    assert "is a non-empty folder (notes.txt) that is not a run of hf-lowrank" in error_line(capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    # The base model's own folder (a saved model, and a pretraining run's folder would be one too).
    before = fingerprint(base_model)
    assert main(["finetune", *finetune_args(base_model, base_model)]) == 2
    assert error_line(capsys).startswith(f"hf-lowrank finetune: error: --output_dir {base_model} holds a saved model")
    assert fingerprint(base_model) == before

    assert main(["finetune", *finetune_args(base_model, foreign, "--max_steps", "1", "--overwrite_output_dir")]) == 0
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- R31
def test_a_torn_checkpoint_is_one_line_and_exit_2(finetuned, base_model, tmp_path, capsys):
    out = Path(shutil.copytree(finetuned, tmp_path / "run"))
    checkpoint = out / "checkpoint-4"
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resume = ["--max_steps", "6", "--resume_from_checkpoint", str(checkpoint)]
    capsys.readouterr()
    assert main(["finetune", *finetune_args(base_model, out, *resume)]) == 2
    assert error_line(capsys).startswith(f"hf-lowrank finetune: error: {weights} is torn: ")

    (checkpoint / MANIFEST_NAME).unlink()  # as the stock Trainer saved it: nothing to verify against
    assert main(["finetune", *finetune_args(base_model, out, *resume)]) == 2
    assert error_line(capsys).startswith(
        f"hf-lowrank finetune: error: Could not read {weights} (truncated or corrupted?)"
    )

    # A pretraining checkpoint is not an adapter: refused by name, before anything is loaded.
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(checkpoint)
    assert main(["finetune", *finetune_args(base_model, out, *resume)]) == 2
    assert error_line(capsys).startswith(
        f"hf-lowrank finetune: error: {checkpoint} is not a checkpoint of `hf-lowrank finetune`"
    )


def test_auto_resume_skips_a_torn_checkpoint(finetuned, base_model, tmp_path, caplog):
    out = Path(shutil.copytree(finetuned, tmp_path / "run"))
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert main(["finetune", *finetune_args(base_model, out)]) == 0  # train further, to step 6
    assert "checkpoint-4/optimizer.pt is torn" in caplog.text
    assert logged_steps(out / "checkpoint-6") == [1, 2, 3, 4, 5, 6]  # from checkpoint-2: steps 3 and 4 again
    verify_checkpoint(out / "checkpoint-4")  # saved again, complete


def test_base_weights_that_do_not_fit_their_config_are_refused(base_model, tmp_path, capsys):
    broken = Path(shutil.copytree(base_model, tmp_path / "base"))
    tensors = load_file(broken / "model.safetensors")
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, broken / "model.safetensors")
    out = tmp_path / "run"
    assert main(["finetune", *finetune_args(broken, out)]) == 2  # it would have fine-tuned a random tensor
    line = error_line(capsys)
    assert line.startswith(f"hf-lowrank finetune: error: The weights in {str(broken)!r} do not fit its config")
    assert dropped in line and not list_checkpoints(out)
