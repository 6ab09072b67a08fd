"""Hostile and careless inputs refused up front with a message that says what to change (R14, R16, R26), errors
that name the file, and `evaluate` refusing weights that do not fit their config."""

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.training.data import DataArguments, load_raw_datasets
from hf_lowrank.training.pretrain import parse_args, run
from hf_lowrank.training.tokenizer import load_or_train_tokenizer, train_bpe_tokenizer

TINY = [
    "--preset", "tiny", "--max_corpus_bytes", "150000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
    "--eval_strategy", "no", "--sample_tokens", "2", "--eval_max_batches", "1", "--disable_tqdm", "true",
    "--max_steps", "2", "--save_steps", "2",
]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- refused up front
BAD_ARGUMENTS = [
    (["--block_size", "1"], "`block_size` must be at least 2"),
    (["--max_steps", "0"], "--max_steps must be >= 1, or -1"),
    (["--config_overrides", "hiden_size=128"], "sets 'hiden_size', which is not a field of the model config"),
    (["--config_overrides", "num_hidden_layers=true"], "`num_hidden_layers` must be a positive integer, got True"),
    (["--config_overrides", "hidden_act=evil"], "Unknown `hidden_act` 'evil'"),
    (["--config_overrides", "rope_theta=0"], "`rope_theta` must be a finite number > 0"),
    (["--config_overrides", "rms_norm_eps=-1"], "`rms_norm_eps` must be a finite number > 0, got -1"),
    (["--spike_threshold", "nan"], "--spike_threshold must be a finite number > 0, got nan"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number >= 0, got nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
    (["--sample_prompt", ""], "--sample_prompt is empty"),
    (["--sample_tokens", "0"], "--sample_tokens must be >= 1"),
    (["--tokenizer_vocab_size", "2000000000"], "--tokenizer_vocab_size 2000000000 exceeds the model's vocab_size 512"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_nonsense_is_refused_before_anything_is_written(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        run(*parse_args(["--output_dir", str(out), *TINY, *argv]))
    assert not out.exists()


def _limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # the old code allocated until the machine died


def pretrain_cli(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "pretrain", *TINY, *args],
        capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=_limited_memory, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    ["num_hidden_layers=1000000", "vocab_size=2000000000", "hidden_size=1048576,intermediate_size=4194304"],
)
@pytest.mark.slow
def test_a_config_too_large_for_memory_is_refused_with_the_estimate(tmp_path, overrides):
    out = tmp_path / "out"
    result = pretrain_cli(["--output_dir", str(out), "--config_overrides", overrides])
    assert result.returncode != 0
    assert re.search(
        r"This model cannot be trained here: it needs at least [\d,.]+ GiB on cpu, which has", result.stderr
    )
    assert "Estimate:" in result.stderr and "parameters x 16 bytes" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_typo_in_config_overrides_fails_the_cli(tmp_path):
    out = tmp_path / "out"
    result = pretrain_cli(["--output_dir", str(out), "--config_overrides", "hiden_size=128"])
    assert result.returncode != 0
    assert "Did you mean 'hidden_size'?" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- before training
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per_device_eval_batch_size", "4096"],
         r"The validation split has \d+ sequences, fewer than one batch \(--per_device_eval_batch_size 4096"),
        (["--per_device_train_batch_size", "8000", "--block_size", "16"],
         r"The training split has \d+ sequences, fewer than one batch \(--per_device_train_batch_size 8000.*no step"),
    ],
)  # fmt: skip
def test_splits_smaller_than_one_batch_are_refused_before_training(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(*parse_args(["--output_dir", str(out), *TINY, *argv]))
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- files named
@pytest.mark.parametrize(
    "content, reason",
    [
        ("def f():\n    return 'caf\xe9'\n".encode("latin-1") * 50, "byte 0xe9 at offset 24 is not UTF-8"),
        (bytes(range(256)) * 40, "byte 0x80 at offset 128 is not UTF-8"),
    ],
    ids=["latin-1", "binary"],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, content, reason, streaming):
    """Streaming reads the bad file only when training reaches it, after hours; it is named before step 0 too."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("def g():\n    return 1\n" * 50)
    bad.write_bytes(content)
    args = DataArguments(train_files=[str(good), str(bad)], validation_split_percentage=0, streaming=streaming)
    with pytest.raises(ValueError, match=re.escape(f"The data file {bad} is not UTF-8 text ({reason})")):
        load_raw_datasets(args)


def test_a_json_text_column_of_numbers_is_named(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"The column 'text' of the 'train' split of the files \[.*numbers\.jsonl'\] "
                       r"holds Value\('int64'\), not text"):  # fmt: skip
        load_raw_datasets(DataArguments(train_files=[str(path)], validation_split_percentage=0))


def test_the_tokenizer_is_saved_atomically_and_a_torn_one_is_named(tmp_path, monkeypatch):
    texts = ["def f(x):\n    return x + 1\n" * 20] * 10
    args = DataArguments(tokenizer_vocab_size=300, tokenizer_train_bytes=0)

    # A crash while the tokenizer is written leaves no tokenizer.json: the next run trains a new one.
    from transformers import PreTrainedTokenizerFast

    original = PreTrainedTokenizerFast.save_pretrained

    def crash_midway(self, save_directory, *a, **k):
        original(self, save_directory, *a, **k)
        (tmp_path / "crashed").touch()
        raise KeyboardInterrupt  # the process dies once the files are written, before they are committed

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train_bpe_tokenizer(texts, vocab_size=300, save_dir=tmp_path / "out")
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", original)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    raw = {"text": texts}
    from datasets import Dataset

    tokenizer = load_or_train_tokenizer(args, Dataset.from_dict(raw), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and len(tokenizer) <= 300

    # A torn tokenizer.json (written by an older version, or damaged) is named, with what to do.
    path = tmp_path / "out" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"Cannot read the tokenizer saved in {path} (torn or corrupted?)")):
        load_or_train_tokenizer(args, Dataset.from_dict(raw), tmp_path / "out")


# ---------------------------------------------------------------------------------------------- evaluate
@pytest.mark.slow
def test_evaluate_refuses_weights_that_do_not_fit_the_config(tmp_path):
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(model_dir)
    train_bpe_tokenizer(["def f(x):\n    return x\n" * 30] * 5, vocab_size=300, save_dir=model_dir)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k.replace("model.layers.", "model.blocks."): v for k, v in weights.items()},
              model_dir / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    text = tmp_path / "eval.txt"
    text.write_text("def g(y):\n    return y * 2\n" * 40)
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "evaluate", str(model_dir), "--files", str(text)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "do not fit its config" in result.stderr and "model tensors missing from the weights" in result.stderr
    assert "model.layers.0." in result.stderr and "Nothing was evaluated" in result.stderr
    assert not (model_dir / "eval_results.json").exists()
