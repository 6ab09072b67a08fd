"""R29: every checkpoint records the world it was trained in (data, tokenizer, model definition); a resume names every
difference, refuses those that change what the weights mean (tokenizer, model definition) unless allowed, and warns
about the rest. Real `hf-lowrank pretrain` runs: a finished 2-step run, then a re-run with --max_steps 4 resumes
from its checkpoint."""

import json
import logging
import shutil
import time

import pytest

from hf_lowrank.training import world
from hf_lowrank.training.pretrain import parse_args, run

DOCS = [
    "def add(a, b):\n    return a + b\n" * 40,
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n" * 30,
    "import os\nfor name in os.listdir('.'):\n    print(name)\n" * 35,
    "while True:\n    line = input()\n    if not line:\n        break\n" * 30,
]


@pytest.fixture
def finished(tmp_path):
    """(argv builder, run folder, data folder): a finished 2-step run on local files, checkpoint-2 kept."""
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(DOCS * 3):
        (data / f"doc{i}.txt").write_text(text)
    out = tmp_path / "run"

    def argv(*extra, steps=4):
        return [
            "--output_dir", str(out), "--preset", "tiny", "--train_files", str(data / "*.txt"),
            "--tokenizer_vocab_size", "300", "--config_overrides", "vocab_size=300", "--block_size", "32",
            "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--sample_tokens", "2",
            "--eval_max_batches", "1", "--disable_tqdm", "true", "--save_steps", "2", "--max_steps", str(steps),
            "--validation_split_percentage", "20", *extra,
        ]  # fmt: skip

    run(*parse_args(argv(steps=2)))
    return argv, out, data


def _world_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming although")]


def test_an_unchanged_world_resumes_silently_and_is_recorded(finished, caplog):
    argv, out, _ = finished
    saved = json.loads((out / "checkpoint-2" / "lowrank_trainer_state.json").read_text())["world"]
    assert saved["tokenizer"] and saved["model"]["rms_norm_eps"] and len(saved["data"]["files"]) == 12
    assert saved["data"]["arguments"]["block_size"] == 32 and not saved["data"]["files"][0]["sampled"]
    with caplog.at_level(logging.WARNING):
        run(*parse_args(argv()))
    assert _world_warnings(caplog) == []
    assert json.loads((out / "checkpoint-4" / "lowrank_trainer_state.json").read_text())["world"] == saved


def test_changed_data_is_resumed_with_each_change_named(finished, caplog):
    argv, out, data = finished
    (data / "doc0.txt").write_text(DOCS[0].replace("add", "sum"))
    with caplog.at_level(logging.WARNING):
        run(*parse_args(argv("--data_seed", "7")))
    warnings = _world_warnings(caplog)
    assert any("contents of 1 data file(s) changed" in w and "doc0.txt" in w for w in warnings), warnings
    assert any("--data_seed is 7 (the checkpoint's: None)" in w for w in warnings), warnings
    assert (out / "checkpoint-4").is_dir()


@pytest.mark.parametrize("change", ["model", "tokenizer_file"])
def test_a_changed_tokenizer_or_model_is_refused_unless_allowed(finished, change, tmp_path, caplog):
    argv, out, _ = finished
    if change == "model":
        extra, expected = ["--config_overrides", "vocab_size=300,rms_norm_eps=1e-05"], "rms_norm_eps is 1e-05"
    else:  # another tokenizer of the same vocabulary size in the run folder, which the re-run loads
        tokenizer = json.loads((out / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[-2:]
        vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other meaning
        (out / "tokenizer.json").write_text(json.dumps(tokenizer))
        extra, expected = [], "the tokenizer differs"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-2: .*{expected}.*--allow_world_change"):
        run(*parse_args(argv(*extra)))
    assert not (out / "checkpoint-4").exists() and sorted(p.name for p in out.iterdir()) == before
    with caplog.at_level(logging.WARNING):
        run(*parse_args(argv(*extra, "--allow_world_change", "true")))
    assert any(expected in w for w in _world_warnings(caplog))


def test_large_files_are_sampled_and_cheap(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(3 * 2**30)  # 3 GiB (sparse): hashing all of it would take many seconds
    started = time.time()
    identity = world.file_identity(big)
    assert identity["sampled"] and identity["size"] == 3 * 2**30 and time.time() - started < 2
    with open(big, "r+b") as handle:  # an edit inside one of the sampled chunks changes the identity
        handle.seek((identity["size"] - world.SAMPLE_BYTES) * 21 // (world.SAMPLES - 1) + 100)
        handle.write(b"x")
    assert world.file_identity(big)["sha256"] != identity["sha256"]
    with open(big, "ab") as handle:  # and so does any change of size
        handle.write(b"y")
    assert world.file_identity(big)["size"] == identity["size"] + 1
    small = tmp_path / "small.txt"
    small.write_text("a" * 1000)
    whole = world.file_identity(small)
    small.write_text("a" * 999 + "b")  # a file up to 16 MiB is hashed whole: any edit shows
    assert not whole["sampled"] and world.file_identity(small)["sha256"] != whole["sha256"]
    shutil.rmtree(tmp_path)
