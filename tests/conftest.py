"""Shared test setup: offline Hub, one torch thread, and the fixtures several files need.

Session-scoped fixtures are built once per run and shared: treat what they return as read-only (``select``,
``save_pretrained`` and copies are fine; changing a tokenizer's attributes or a dataset in place is not).
The variant tables are plain data, imported by the test files that parametrize over them
(``from conftest import MODEL_VARIANTS``).

Fast loop: ``pytest -m "not slow"`` skips the multi-process and end-to-end tests (``@pytest.mark.slow``).
"""

import multiprocessing
import os

# No network in tests: an unreachable Hub costs ~50 s of retries per load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread, for the whole session: tests use tiny matrices, and several test processes (subprocess
# CLIs, two-rank launches) share 2 cores; more threads only spin against each other (seen 10-30x slower under
# contention). No test file needs to set it again.
torch.set_num_threads(1)

# Model variants every model-level battery runs through: config overrides of the `tiny` preset.
MODEL_VARIANTS = {
    "lowrank": {},
    "dense": {"lowrank_modules": []},
    "mixed": {"lowrank_modules": ["q_proj", "o_proj", "down_proj"], "rank_overrides": {"down_proj": 5}},
    "normal_init_tied": {"lowrank_init": "normal", "tie_word_embeddings": True},
    "mha": {"num_key_value_heads": 4},
}

# The optimizer's ablation switches: Spectron, and what remains without orthogonalization or renormalization.
SPECTRON_VARIANTS = {
    "spectron": {},
    "muon": {"renormalize": False},
    "renorm": {"orthogonalize": False},
    "neither": {"orthogonalize": False, "renormalize": False},
}

# The data every seconds-long Trainer test trains on: the built-in corpus's first 250 kB, blocks of 64 tokens.
TINY_CORPUS_BYTES = 250_000
TINY_BLOCK_SIZE = 64


def tiny_model(variant: str = "lowrank", seed: int = 0, **overrides):
    """A freshly initialised `tiny` model of ``MODEL_VARIANTS[variant]`` (plus ``overrides``), seeded."""
    from hf_lowrank import LowRankLlamaForCausalLM, preset_config

    torch.manual_seed(seed)
    return LowRankLlamaForCausalLM(preset_config("tiny", **MODEL_VARIANTS[variant], **overrides))


def fork_ranks(target, *args, world_size: int = 2, timeout: float = 120) -> tuple[list, list[int]]:
    """Run ``target(rank, *args, results)`` in ``world_size`` forked processes (each sets up its own process group)
    and return ``(what each put on results, one item each in arrival order, the processes' pids by rank)``, after
    checking that every process exited with status 0."""
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    processes = [fork.Process(target=target, args=(rank, *args, results)) for rank in range(world_size)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes, [process.pid for process in processes]


@pytest.fixture
def tiny_config():
    from hf_lowrank import preset_config

    return preset_config("tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``(tokenizer, train blocks, validation blocks)``: a BPE tokenizer (the `tiny` vocabulary, 512) trained once
    per session on the built-in corpus, and the corpus packed into blocks of ``TINY_BLOCK_SIZE``."""
    from hf_lowrank import preset_config
    from hf_lowrank.training.data import DataArguments, build_datasets

    out = tmp_path_factory.mktemp("tiny-data")
    args = DataArguments(max_corpus_bytes=TINY_CORPUS_BYTES, block_size=TINY_BLOCK_SIZE)
    return build_datasets(args, output_dir=str(out), block_size=TINY_BLOCK_SIZE, config=preset_config("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data):
    """The session's trained tokenizer (see `tiny_data`)."""
    return tiny_data[0]
