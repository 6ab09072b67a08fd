import os

# No network in tests: an unreachable Hub costs ~50 s of retries per load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tests use tiny matrices, and several test processes (subprocess CLIs, two-rank launches)
# share 2 cores; more threads only spin against each other (seen 10-30x slower under contention).
torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    from hf_lowrank import preset_config

    return preset_config("tiny")
