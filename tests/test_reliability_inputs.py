"""Safe spectral math and determinism (R12, R13: what tests/test_spectron.py does not cover yet) and clear errors
for bad arguments, resume paths and data given through the command line (R14, R16)."""

import hashlib
import re

import pytest
import torch
from transformers import TrainingArguments

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.optim import Spectron, build_optimizer, newton_schulz, power_iteration, spectral_norm
from hf_lowrank.training.checkpointing import resolve_resume_checkpoint
from hf_lowrank.training.pretrain import parse_args, run
from hf_lowrank.training.trainer import LowRankTrainer

TINY = [
    "--preset", "tiny", "--max_corpus_bytes", "250000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    "--eval_strategy", "no", "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- R12
def factor_pair(case, dtype):
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(96, 12, generator=g) / 10, torch.randn(12, 80, generator=g) / 9
    if case == "zero":
        up.zero_(), down.zero_()
    elif case == "tiny":
        up.mul_(1e-30), down.mul_(1e-30)
    elif case == "rank_deficient":
        up.copy_(up[:, :1].expand_as(up))
        down[3:].zero_()
    elif case == "huge":
        up.mul_(1e6), down.mul_(1e6)
    return up.to(dtype).requires_grad_(), down.to(dtype).requires_grad_()


@pytest.mark.parametrize("case", ["zero", "tiny", "rank_deficient", "huge"])
def test_degenerate_bf16_factors_give_finite_updates_in_float32_state(case):
    up, down = factor_pair(case, torch.bfloat16)
    optimizer = Spectron([(up, down)], lr=0.05, rebalance_every=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        up.grad = torch.randn(up.shape, generator=g).to(torch.bfloat16)
        down.grad = torch.randn(down.shape, generator=g).to(torch.bfloat16)
        optimizer.step()
    assert up.dtype == down.dtype == torch.bfloat16
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    for param in (up, down):
        state = optimizer.state[param]
        assert all(torch.isfinite(t).all() for t in state.values())
        assert {state[k].dtype for k in ("momentum_buffer", "u", "v", "sigma")} == {torch.float32}


def test_spectral_math_runs_in_float32_for_bf16_inputs():
    m = torch.randn(64, 8, dtype=torch.bfloat16)
    u, v = torch.randn(64, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    assert newton_schulz(m).dtype == spectral_norm(m).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in power_iteration(m, u, v))


@pytest.mark.xfail(
    strict=True,
    reason="Known gap in optim/spectron.py: the Frobenius norm that Newton-Schulz divides by comes from the float32 "
    "Gram matrix, which overflows for entries above ~1e18, so a finite but huge momentum gives NaN factors. "
    "The Trainer path clips gradients (max_grad_norm=1.0) and the guard skips non-finite steps; with clipping "
    "off, pre-scaling by max|m| before the Gram would fix it.",
)
def test_huge_finite_gradients_give_finite_updates():
    up, down = factor_pair("normal", torch.float32)
    optimizer = Spectron([(up, down)], lr=0.05)
    up.grad, down.grad = torch.full_like(up, 1e20), torch.full_like(down, -1e20)
    optimizer.step()
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


# ---------------------------------------------------------------------------------------------- R13
def test_two_identical_model_runs_are_bitwise_equal():
    """The whole tiny model (every routing group, tied embeddings) for 3 Spectron steps, twice."""
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LowRankLlamaForCausalLM(preset_config("tiny"))
        optimizer = build_optimizer(model, "spectron", lr=0.02, weight_decay=0.01)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        runs.append((dict(model.named_parameters()), optimizer.state_dict()["state"]))
    (params_a, state_a), (params_b, state_b) = runs
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    assert all(torch.equal(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i])


# ---------------------------------------------------------------------------------------------- R14, R16
@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--gradient_accumulation_steps", "0"], ValueError, "--gradient_accumulation_steps must be >= 1"),
        (["--per_device_train_batch_size", "0"], ValueError, "--per_device_train_batch_size must be >= 1"),
        (["--save_steps", "0"], ValueError, "--save_steps must be > 0 with --save_strategy steps"),
        (["--eval_strategy", "steps", "--eval_steps", "0"], ValueError, "--eval_steps must be > 0"),
        (["--spike_action", "revert"], ValueError, "--spike_action must be one of log, skip, rollback"),
        (["--max_consecutive_nonfinite", "-1"], ValueError, "--max_consecutive_nonfinite must be >= 0"),
        (["--max_rollbacks", "-1"], ValueError, "--max_rollbacks must be >= 0"),
        (["--eval_max_batches", "0"], ValueError, "--eval_max_batches must be >= 1"),
        (["--spike_window", "1"], ValueError, "spike window must be at least 2"),
        (["--resume_from_checkpoint", "missing/checkpoint-9"], FileNotFoundError, "checkpoint-9: no such folder"),
        (["--tokenizer_name", "./missing-tokenizer"], FileNotFoundError, "./missing-tokenizer: no such folder"),
    ],
)
def test_bad_arguments_fail_before_anything_is_written(tmp_path, argv, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=re.escape(message)):
        run(*parse_args(["--output_dir", str(out), *TINY, *argv]))
    assert not out.exists()


def test_an_output_dir_that_is_a_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="is a file, not a folder; choose another --output_dir"):
        run(*parse_args(["--output_dir", str(out), *TINY]))
    assert out.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, error, message",
    [
        (["--train_files", "{tmp}/missing.txt"], FileNotFoundError, "no such file"),
        (["--train_files", "{tmp}/empty.txt", "{tmp}/empty.txt"], ValueError, "empty or whitespace"),
        (["--block_size", "4096"], ValueError, "exceeds the model's `max_position_embeddings`"),
        (["--spike_action", "rollback", "--save_strategy", "no"], ValueError, "set --save_strategy steps"),
    ],
)
def test_bad_data_and_settings_are_clear_errors_through_the_cli(tmp_path, argv, error, message):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(error, match=re.escape(message)):
        run(*parse_args(["--output_dir", str(tmp_path / "out"), *TINY, *argv]))


def _fingerprint(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_that_does_not_fit_the_checkpoint_is_refused_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    first = ["--output_dir", str(out), *TINY, "--max_steps", "2", "--save_steps", "2"]
    run(*parse_args(first))
    before = _fingerprint(out)
    assert any(p.name == "optimizer.pt" for p in before)

    # Another model shape: refused before any weight is loaded, naming a tensor and what to change.
    with pytest.raises(ValueError, match=r"saved for a different model: \d+ tensors differ in shape.*--rank"):
        run(*parse_args([*first, "--max_steps", "4", "--rank", "4"]))
    # Another optimizer (and so another default lr): refused before its state is loaded (R23).
    with pytest.raises(ValueError, match=r"with --learning_rate 0\.003 \(the checkpoint's: 0\.02\), --optimizer adamw"):
        run(*parse_args([*first, "--max_steps", "4", "--optimizer", "adamw"]))
    after = _fingerprint(out)
    assert all(after.get(path) == digest for path, digest in before.items())  # nothing changed or deleted


def test_resume_paths_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a checkpoint-N folder"):
        resolve_resume_checkpoint(tmp_path / "file")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-3").mkdir(parents=True)  # a save that never completed
    with pytest.raises(ValueError, match="is a run folder, not a checkpoint; pass one of its checkpoint-N"):
        resolve_resume_checkpoint(run_dir)
    trainer = LowRankTrainer(
        model=LowRankLlamaForCausalLM(preset_config("tiny")),
        args=TrainingArguments(output_dir=str(run_dir), report_to="none", use_cpu=True),
    )
    with pytest.raises(ValueError, match="holds no complete checkpoint; leave it unset to start from scratch"):
        trainer.train(resume_from_checkpoint=True)
