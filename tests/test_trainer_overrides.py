"""`LowRankTrainer` replaces or relies on a few private `Trainer` members (docs/trainer_internals.md lists each and
why). A new Transformers release can change them silently, so each upstream source this package was checked
against is pinned here by a hash of `inspect.getsource`: a release that changes one fails this test, naming the
override to re-check, instead of silently dropping state from checkpoints.

After re-checking an override against the new upstream source, add the hash that the failure prints (with the
Transformers version) to ``PINNED``; ``python tests/test_trainer_overrides.py`` prints every current hash.
"""

import hashlib
import inspect
import sys

import transformers
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler

from hf_lowrank.training.trainer import LowRankTrainer

OWNERS = {"Trainer": Trainer, "CallbackHandler": CallbackHandler}

# upstream member: (what of ours depends on it, {sha256[:16] of its source: Transformers versions checked}).
PINNED = {
    "Trainer._save_checkpoint": (
        "LowRankTrainer._save_checkpoint and _write_checkpoint_files (a rewrite: staging folder, manifest, rotation; "
        "keep its file list and order)",
        {"a9111e30faa99339": "5.17.0, 5.24.0"},
    ),
    "Trainer._load_from_checkpoint": (
        "LowRankTrainer._load_from_checkpoint (checks first, then calls it)",
        {"4711d0506786db15": "5.17.0", "a2804e8d93a297e3": "5.24.0"},
    ),
    "Trainer._load_optimizer_and_scheduler": (
        "LowRankTrainer._load_optimizer_and_scheduler (replaces it on one process or DDP)",
        {"bdcb956f06c459ab": "5.17.0", "741032f57d6fb802": "5.24.0"},
    ),
    "Trainer._load_rng_state": (
        "LowRankTrainer._load_rng_state (calls it, names the file on failure)",
        {"d5ebdfc0a0884c4b": "5.17.0, 5.24.0"},
    ),
    "Trainer._run_epoch": (
        "LowRankTrainer._run_epoch (stops before the first step at max_steps, then calls it)",
        {"ebe374933064ecd6": "5.17.0", "31aff00f34c302a2": "5.24.0"},
    ),
    "Trainer._init_training_state": (
        "LowRankTrainer._init_training_state (calls it, then moves the data position by the rollback offset)",
        {"8fbd17ebb7d3793d": "5.17.0, 5.24.0"},
    ),
    "Trainer.set_initial_training_values": (
        "LowRankTrainer.set_initial_training_values (reads and replaces its returned tuple by position: 0 epochs, "
        "1 steps per epoch, 6 max_steps)",
        {"81697f5f3100a3ad": "5.17.0, 5.24.0"},
    ),
    "Trainer._get_output_dir": (
        "LowRankTrainer._save_checkpoint (the run folder)",
        {"97172085342ac46c": "5.17.0, 5.24.0"},
    ),
    "Trainer._save_optimizer_and_scheduler": (
        "LowRankTrainer._write_checkpoint_files (writes into the staging folder)",
        {"c5ef974db69ab993": "5.17.0, 5.24.0"},
    ),
    "Trainer._save_scaler": ("LowRankTrainer._write_checkpoint_files", {"fd1ce04cfea46123": "5.17.0, 5.24.0"}),
    "Trainer._save_rng_state": ("LowRankTrainer._write_checkpoint_files", {"27a97d1061240f42": "5.17.0, 5.24.0"}),
    "Trainer._push_from_checkpoint": (
        "LowRankTrainer._save_checkpoint (push_to_hub of a committed checkpoint)",
        {"b336b2f27274f0a5": "5.17.0", "2523da925347bd9a": "5.24.0"},
    ),
    "Trainer._maybe_log_save_evaluate": (
        "LowRankTrainer._roll_back (sets _globalstep_last_logged, which this method reads)",
        {"af101534f0f7b2d7": "5.17.0, 5.24.0"},
    ),
    "CallbackHandler.call_event": (
        "SpectralDiagnosticsCallback._run_before_reporting_callbacks (finds the handler in the caller's frame)",
        {"b0b7d5fe580fbd43": "5.17.0, 5.24.0"},
    ),
}


def source_hash(member: str) -> str | None:
    owner, name = member.split(".")
    function = getattr(OWNERS[owner], name, None)
    if function is None:
        return None
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_every_private_override_of_lowrank_trainer_is_pinned():
    overridden = {
        f"Trainer.{name}"
        for name, value in vars(LowRankTrainer).items()
        if callable(value) and name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert overridden <= PINNED.keys(), f"pin the upstream source of {sorted(overridden - PINNED.keys())}"
    assert "Trainer.set_initial_training_values" in PINNED  # public by name, but indexed by tuple position


def test_upstream_sources_are_the_ones_the_overrides_were_written_against():
    changed = []
    for member, (ours, known) in PINNED.items():
        now = source_hash(member)
        if now not in known:
            what = "is gone" if now is None else f"has a source this package was not checked against (hash {now})"
            changed.append(f"- {member} {what}: re-check {ours}.")
    assert not changed, (
        f"transformers {transformers.__version__} changed private Trainer code that hf-lowrank relies on:\n"
        + "\n".join(changed)
        + "\nRead the new upstream source, adapt the override (see docs/trainer_internals.md), then add the new "
        "hash to PINNED in tests/test_trainer_overrides.py."
    )


if __name__ == "__main__":
    print(f"transformers {transformers.__version__}")
    for member in PINNED:
        print(f"{source_hash(member)}  {member}")
    sys.exit(0)
