"""The stability sweep's logic on the tiny preset: outputs, skip-finished restarts, divergence detection."""

import dataclasses
import json
import math

import pytest

from hf_lowrank.experiments.sweep import (
    VARIANTS,
    Job,
    SweepPlan,
    best_learning_rate,
    is_diverged,
    run_sweep,
    smoke_settings,
    training_flops_per_token,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stability-cache")  # the tokenized corpus, shared by the tests


def test_sweep_writes_outputs_and_skips_finished_runs(tmp_path, cache_dir):
    settings = smoke_settings()  # dense-adamw and lowrank-spectron, 2 lrs each, 2 seeds, 8 steps
    lines = []
    first = run_sweep(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lines.append)
    # 4 grid runs + a second seed per variant at its best lr + Spectron at the dense model's FLOPs
    assert len(first["trained"]) == 7
    assert any(line.startswith("[7/7]") and "ETA" in line for line in lines)
    for name in ("results.json", "results.md", "loss_curves.png", "loss_vs_lr.png", "update_norm.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list((tmp_path / "runs").glob("*.json"))) == 7

    summary = json.loads((tmp_path / "results.json").read_text())
    for variant in ("dense-adamw", "lowrank-spectron"):
        entry = summary["variants"][variant]
        assert entry["best_lr"] in settings.lr_grids[variant]
        assert [run["seed"] for run in entry["best_seeds"]] == [0, 1]
        assert entry["diverged"] == 0 and math.isfinite(entry["final_loss_mean"])
    flops = {run["variant"]: run["tokens"] * run["flops_per_token"] for run in summary["equal_flops"]}
    assert flops.keys() == {"dense-adamw", "lowrank-spectron"}
    assert flops["lowrank-spectron"] == pytest.approx(flops["dense-adamw"], rel=0.1)  # up to rounding to a step
    run = json.loads(next((tmp_path / "runs").glob("lowrank-spectron_*.json")).read_text())
    assert len(run["losses"]) == run["steps"] and run["update_norms"] and run["max_update_norm"] > 0
    assert "| low-rank + Spectron |" in (tmp_path / "results.md").read_text()

    second = run_sweep(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lines.append)
    assert second["trained"] == []
    assert second["summary"]["variants"] == summary["variants"]


def test_changed_settings_retrain(tmp_path, cache_dir):
    settings = dataclasses.replace(smoke_settings(), lr_grids={"dense-adamw": (1e-3,)}, seeds=1)
    assert run_sweep(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)["trained"]
    changed = dataclasses.replace(settings, max_grad_norm=0.5)
    assert len(run_sweep(changed, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)["trained"]) == 1


def test_planted_divergence_is_detected(tmp_path, cache_dir):
    # AdamW at lr 1e30 overflows after its first full-lr step: the guard stops the run at the non-finite loss.
    settings = dataclasses.replace(smoke_settings(), lr_grids={"lowrank-adamw": (1e-3, 1e30)}, seeds=1)
    summary = run_sweep(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)["summary"]
    entry = summary["variants"]["lowrank-adamw"]
    runs = {run["lr"]: run for run in entry["grid"]}
    assert not runs[1e-3]["diverged"] and runs[1e-3]["steps_done"] == settings.max_steps
    assert runs[1e30]["diverged"] and runs[1e30]["stop_reason"].startswith("non-finite")
    assert runs[1e30]["steps_done"] < settings.max_steps  # stopped there, not trained on
    assert entry["diverged"] == 1 and entry["best_lr"] == 1e-3
    assert "1 / 2" in (tmp_path / "results.md").read_text()


def test_divergence_rule_and_best_lr():
    assert is_diverged(float("nan"), 5.0) and is_diverged(float("inf"), 5.0)
    assert is_diverged(5.1, 5.0) and not is_diverged(4.9, 5.0)
    assert is_diverged(4.0, 5.0, stop_reason="loss above the initial loss for 20 steps")
    grid = [
        {"lr": 0.1, "final_loss": 3.0, "diverged": True},
        {"lr": 0.03, "final_loss": 4.0, "diverged": False},
        {"lr": 0.01, "final_loss": 4.5, "diverged": False},
    ]
    assert best_learning_rate(grid) == 0.03  # a diverged run never wins, whatever its loss
    assert best_learning_rate(grid[:1]) is None


def test_plan_and_flops_accounting():
    settings = smoke_settings()
    plan = SweepPlan(settings, ["dense-adamw", "lowrank-spectron"])
    assert plan.expected_runs() == 4 + 2 + 1
    dense, factorized = settings.model_config(dense=True), settings.model_config(dense=False)
    assert training_flops_per_token(dense, 64) > training_flops_per_token(factorized, 64)
    assert plan.flops_steps("lowrank-spectron") > settings.max_steps == plan.flops_steps("dense-adamw")
    job = Job("lowrank-spectron", 0.05, 0, 8, "grid")
    assert job.id == "lowrank-spectron_lr0.05_seed0_steps8"
    with pytest.raises(ValueError, match="Unknown variants"):
        SweepPlan(settings, ["sgd"])
    with pytest.raises(ValueError, match="No learning-rate grid"):
        SweepPlan(settings, ["lowrank-muon"])
    assert set(VARIANTS) >= {"dense-adamw", "lowrank-adamw", "lowrank-muon", "lowrank-renorm", "lowrank-spectron"}
