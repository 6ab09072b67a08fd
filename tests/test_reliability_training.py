"""Exact resume (R3-R6), non-finite guard (R10) and loss-spike policy (R11), with real tiny Trainer runs."""

import copy
import json
import logging
import math
import random

import pytest
import torch
from conftest import fork_ranks
from safetensors.torch import load_file
from trainers import PoisonTrainer, tiny_trainer
from transformers import TrainerCallback

from hf_lowrank.training.checkpointing import verify_checkpoint
from hf_lowrank.training.diagnostics import LossSpikeDetector
from hf_lowrank.training.guards import APPLY, ROLLBACK, SKIP, NonFiniteTrainingError, StepGuard


class RecordingTrainer(PoisonTrainer):
    """A `PoisonTrainer` that also snapshots the state each rollback restored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollback_snapshots: list[dict] = []

    def _roll_back(self):
        super()._roll_back()
        self.rollback_snapshots.append(
            {
                "step": self.state.global_step,
                "lr_steps": self.lr_scheduler.last_epoch,
                "params": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()["state"]),
            }
        )


class UpdateSpy(TrainerCallback):
    """Per optimizer step: did the parameters change, did the optimizer state change."""

    def __init__(self):
        self.params_changed, self.state_changed = {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._params = [p.detach().clone() for p in model.parameters()]
        self._state = copy.deepcopy(optimizer.state_dict()["state"])

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        self.params_changed[step] = not all(torch.equal(a, b) for a, b in zip(self._params, model.parameters()))
        self.state_changed[step] = not states_equal(self._state, optimizer.state_dict()["state"])


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i]) for i in a
    )


def make_trainer(output_dir, tiny_data, train_blocks=None, guard=None, poison=None, callbacks=(), **overrides):
    settings = dict(max_steps=6, lr_scheduler_type="cosine", warmup_steps=0, save_strategy="no")
    return tiny_trainer(
        output_dir,
        tiny_data,
        {**settings, **overrides},
        trainer_class=RecordingTrainer,
        train_blocks=train_blocks,
        guard=guard,
        poison=poison,
        callbacks=list(callbacks),
    )


def step_rows(trainer, after=0):
    return [
        (row["step"], row["loss"], row["grad_norm"], row["learning_rate"])
        for row in trainer.state.log_history
        if "loss" in row and row["step"] > after
    ]


# ---------------------------------------------------------------------------------------------- R3-R6
class Snapshot(TrainerCallback):
    """Optimizer and guard state after step `at` (uninterrupted run) or at the start of a resumed run."""

    def __init__(self, trainer_ref, at=None):
        self.trainer_ref, self.at, self.taken = trainer_ref, at, None

    def _take(self, optimizer):
        trainer = self.trainer_ref[0]
        self.taken = {
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "guard": copy.deepcopy(trainer.guard.state_dict()),
        }

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.at == state.global_step:
            self._take(optimizer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.at is None:
            self._take(optimizer)


def detector_guard():
    return StepGuard(spike_detector=LossSpikeDetector(window=3, threshold=4.0, warmup=0))


def test_resume_is_bitwise_exact_inside_and_across_epochs(tmp_path, tiny_data):
    """32 blocks in batches of 8: 4 steps per epoch. Resume at step 3 (epoch 0) and step 6 (epoch 1) of 10."""
    settings = dict(train_blocks=32, max_steps=10, save_strategy="steps", save_steps=3, warmup_steps=2)
    ref = [None]
    snapshots = {k: Snapshot(ref, at=k) for k in (3, 6)}
    straight = make_trainer(tmp_path / "straight", tiny_data, guard=detector_guard(), **settings)
    ref[0] = straight
    for snapshot in snapshots.values():
        straight.add_callback(snapshot)
    straight.train()
    assert straight.state.epoch == 2.5

    for k in (3, 6):
        ref = [None]
        at_resume = Snapshot(ref)
        resumed = make_trainer(tmp_path / f"resumed-{k}", tiny_data, guard=detector_guard(), **settings)
        ref[0] = resumed
        resumed.add_callback(at_resume)
        resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{k}"))

        # R5, R11: optimizer state (momenta, power vectors, sigma, steps), lr and guard/detector state round-trip.
        saved, loaded = snapshots[k].taken, at_resume.taken
        assert states_equal(saved["optimizer"]["state"], loaded["optimizer"]["state"])
        spectron = saved["optimizer"]["state"][0]
        assert {"momentum_buffer", "u", "v", "sigma", "step"} <= spectron.keys() and spectron["step"] == k
        assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [
            g["lr"] for g in loaded["optimizer"]["param_groups"]
        ]
        assert saved["guard"] == loaded["guard"] and saved["guard"]["spike_detector"]["steps"] == k
        # R3, R6: identical losses, grad norms and learning rates at every step after the resume, bitwise.
        assert step_rows(resumed, after=k) == step_rows(straight, after=k)
        # R4: the same batches, in the same order.
        assert resumed.batch_hashes == straight.batch_hashes[k:]
        # R3: identical final parameters and optimizer state, and the same guard state.
        for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
            assert torch.equal(a, b), name
        assert states_equal(straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"])
        assert straight.guard.state_dict() == resumed.guard.state_dict()


# ---------------------------------------------------------------------------------------------- R10
def test_nonfinite_steps_are_skipped_before_the_optimizer_runs(tmp_path, tiny_data, caplog):
    spy = UpdateSpy()
    trainer = make_trainer(tmp_path, tiny_data, max_steps=5, poison={2: math.nan, 3: math.inf}, callbacks=[spy])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert spy.params_changed == {1: True, 2: False, 3: False, 4: True, 5: True}
    assert spy.state_changed == spy.params_changed
    counts = {row["step"]: row["guard/skipped_steps"] for row in trainer.state.log_history if "loss" in row}
    assert counts == {1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
    assert "Step 2: non-finite loss or gradient; the update was skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # A skipped step still counts: the LR schedule advanced on every step, as the step counter did.
    assert trainer.state.global_step == trainer.lr_scheduler.last_epoch == 5


def test_too_many_consecutive_nonfinite_steps_stop_the_run_with_checkpoints_intact(tmp_path, tiny_data):
    trainer = make_trainer(
        tmp_path,
        tiny_data,
        max_steps=8,
        poison={2: math.nan, 3: math.nan, 4: math.nan},
        guard=StepGuard(max_consecutive_nonfinite=2),
        save_strategy="steps",
        save_steps=1,
    )
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive optimizer steps.*--max_consecutive_nonfinite=2"):
        trainer.train()
    assert trainer.state.global_step == 3
    for step in (1, 2, 3):
        verify_checkpoint(tmp_path / f"checkpoint-{step}")
    first, last = (load_file(tmp_path / f"checkpoint-{s}" / "model.safetensors") for s in (1, 3))
    assert all(torch.equal(first[k], last[k]) for k in first)  # no non-finite update reached the weights


# ---------------------------------------------------------------------------------------------- R11
def spike_guard(action, **kwargs):
    detector = LossSpikeDetector(window=3, threshold=3.0, min_increase=0.5, warmup=0)
    return StepGuard(spike_detector=detector, spike_action=action, **kwargs)


def test_spike_skip_drops_that_update_only(tmp_path, tiny_data):
    spy = UpdateSpy()
    trainer = make_trainer(tmp_path, tiny_data, poison={5: 30.0}, guard=spike_guard("skip"), callbacks=[spy])
    trainer.train()
    assert spy.params_changed == {1: True, 2: True, 3: True, 4: True, 5: False, 6: True}
    assert trainer.guard.spike_detector.spikes == 1 and trainer.guard.skipped_steps == 1
    assert trainer.state.log_history[4]["guard/skipped_steps"] == 1


def test_spike_rollback_reloads_the_last_checkpoint_and_finishes(tmp_path, tiny_data):
    trainer = make_trainer(
        tmp_path,
        tiny_data,
        max_steps=8,
        poison={5: 30.0},
        guard=spike_guard("rollback", max_rollbacks=1),
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    (snapshot,) = trainer.rollback_snapshots
    checkpoint = tmp_path / "checkpoint-4"
    assert snapshot["step"] == snapshot["lr_steps"] == 4
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(snapshot["params"][k], saved[k]) for k in saved)
    assert states_equal(snapshot["optimizer"], torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"])
    # Training went on with the batches after the spike (none is seen twice) and finished.
    assert trainer.state.global_step == 8 and trainer.guard.rollbacks == 1
    assert len(trainer.batch_hashes) == 9 and len(set(trainer.batch_hashes)) == 9
    assert json.loads((tmp_path / "checkpoint-8" / "lowrank_trainer_state.json").read_text())["guard"]["rollbacks"] == 1


def test_step_guard_on_synthetic_series():
    rng = random.Random(0)
    flat = [3.0 + rng.gauss(0, 0.01) for _ in range(20)]

    guard = StepGuard(max_consecutive_nonfinite=2)
    verdicts = [guard.decide(x, finite, step=i) for i, (x, finite) in enumerate([(1.0, True), (math.nan, True)])]
    verdicts += [guard.decide(1.0, False, step=3), guard.decide(1.0, True, step=4), guard.decide(math.inf, True, 5)]
    assert verdicts == [APPLY, SKIP, SKIP, APPLY, SKIP] and guard.consecutive_nonfinite == 1
    guard.decide(math.nan, True, step=6)
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive"):
        guard.decide(math.nan, True, step=7)

    for action, on_spike in (("log", APPLY), ("skip", SKIP), ("rollback", ROLLBACK)):
        guard = StepGuard(spike_detector=LossSpikeDetector(window=10, threshold=4.0, warmup=5), spike_action=action)
        verdicts = [guard.decide(x, True, step=i) for i, x in enumerate(flat[:4] + [9.0] + flat[4:] + [9.0])]
        # The first jump falls in the warm-up; the second is a spike.
        assert verdicts == [APPLY] * 21 + [on_spike], action
        assert guard.spike_detector.spikes == 1 and guard.skipped_steps == (action != "log")

    guard = spike_guard("rollback", max_rollbacks=0)
    [guard.decide(x, True, step=i) for i, x in enumerate(flat[:5])]
    with pytest.raises(NonFiniteTrainingError, match="--max_rollbacks=0"):
        guard.decide(30.0, True, step=6)

    # The state is plain JSON and resumes the same decisions.
    guard = spike_guard("skip")
    [guard.decide(x, True, step=i) for i, x in enumerate(flat[:6])]
    clone = spike_guard("skip")
    clone.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    tail = flat[6:] + [30.0, math.nan, 3.0]
    assert [guard.decide(x, True, step=0) for x in tail] == [clone.decide(x, True, step=0) for x in tail]
    assert guard.state_dict() == clone.state_dict()

    with pytest.raises(ValueError, match="spike_action must be one of"):
        StepGuard(spike_action="ignore")


def _decide_on_rank(rank, init_file, series, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = spike_guard("skip")
    verdicts = [guard.decide(loss, finite, step=i + 1) for i, (loss, finite) in enumerate(series[rank])]
    results.put((rank, verdicts, guard.state_dict()))
    torch.distributed.destroy_process_group()


def test_every_rank_makes_the_same_decision(tmp_path):
    """Two gloo processes: a NaN or a spike on one rank only skips the step on both; the detector sees the mean."""
    ok = [(3.0, True), (3.1, True), (2.9, True), (3.0, True)]
    rank0 = ok + [(3.0, True), (3.0, True), (3.0, True)]
    rank1 = ok + [(math.nan, True), (3.0, False), (40.0, True)]
    results, _ = fork_ranks(_decide_on_rank, tmp_path / "init", [rank0, rank1])
    outcomes = {rank: (verdicts, state) for rank, verdicts, state in results}
    assert outcomes[0] == outcomes[1]
    verdicts, state = outcomes[0]
    assert verdicts == [APPLY] * 4 + [SKIP, SKIP, SKIP]
    assert state["nonfinite_steps"] == 2 and state["spike_detector"]["spikes"] == 1
    assert state["spike_detector"]["history"] == pytest.approx([3.1, 2.9, 3.0])  # means over the ranks
