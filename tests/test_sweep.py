"""The stability study's tool on the tiny preset: the plan's rules, outputs, exact continuation from the rung,
restarts that redo nothing, and divergence decided by the package's own guard."""

import dataclasses
import json
import math

import pytest

from hf_lowrank.experiments.plan import (
    VARIANTS,
    Job,
    Segment,
    StudyPlan,
    is_done,
    next_half_decade,
    smoke_settings,
)
from hf_lowrank.experiments.report import lr_width_decades
from hf_lowrank.experiments.runner import prepare_data, run_segment
from hf_lowrank.experiments.sweep import run_study

SUMMARY_VARIANT_FIELDS = {"learning_rates", "best_lr", "final_loss", "diverged", "lr_width_decades"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stability-cache")  # the tokenized corpus, shared by the tests


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("study")
    lines = []
    result = run_study(smoke_settings(), out, workers=0, cache_dir=cache_dir, log=lines.append)
    return out, result, lines


@pytest.mark.slow
def test_study_writes_the_summary_report_and_plots(study):
    out, result, lines = study
    settings = smoke_settings()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and any("ETA" in line for line in lines)
    assert summary["steps"] == settings.steps and summary["tokens_per_run"] == settings.steps * 4 * 32
    assert math.isfinite(summary["unigram_loss"])
    for name, entry in summary["variants"].items():
        assert SUMMARY_VARIANT_FIELDS <= entry.keys(), name
        assert entry["best_lr"] in entry["learning_rates"]
        assert len(entry["final_loss"]) == settings.seeds  # both seeds at the best lr
        assert entry["lr_width_decades"] is not None and entry["lr_width_decades"] >= 0
    # The smoke grids never diverge, so each was extended upward once (max_extensions=1).
    assert summary["variants"]["spectron"]["learning_rates"] == [0.03, 0.1, 0.3]
    assert set(summary["rank_ablation"]) == {"0.125", "0.25"}
    assert all(len(losses) == settings.seeds for losses in summary["rank_ablation"].values())
    flops = {name: entry["training_flops"] for name, entry in summary["equal_flops"].items()}
    assert flops.keys() == {"dense_adamw", "dense_muon", "lowrank_adamw", "spectron"}
    assert flops["dense_muon"] == flops["dense_adamw"]  # the dense budget itself: both dense models, same steps
    assert summary["variants"]["dense_muon"]["optimizer"] == "muon"  # trained with Muon on the dense projections
    assert "| dense + Muon |" in (out / "results.md").read_text()
    for name in ("lowrank_adamw", "spectron"):  # more tokens, the same FLOPs up to rounding to a step
        assert flops[name] == pytest.approx(flops["dense_adamw"], rel=0.05)
        assert summary["equal_flops"][name]["tokens"] > summary["equal_flops"]["dense_adamw"]["tokens"]
    assert {(r["variant"], r["clip"]) for r in summary["stress"]} == {("lowrank_adamw", False), ("spectron", False)}
    for name in ("summary.json", "results.md", "loss_curves.png", "loss_vs_lr.png", "norms.png", "stress.png",
                 "rank_and_flops.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert "| low-rank + Spectron |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_records_carry_the_mechanism_curves(study):
    out, _, _ = study
    record = json.loads((out / "runs" / "spectron_lr0.1_seed0_steps12.json").read_text())
    assert record["curve"]["step"] == list(range(1, 13)) and len(record["curve"]["loss"]) == 12
    diag = record["diagnostics"]
    assert diag["step"] == [2, 4, 6, 8, 10, 12]
    for key in ("sigma_up_max", "sigma_down_mean", "update_norm_max", "update_norm_mean", "weight_norm_max"):
        assert len(diag[key]) == 6 and all(v > 0 for v in diag[key]), key
    dense = json.loads((out / "runs" / "dense_adamw_lr0.01_seed0_steps12.json").read_text())
    assert dense["diagnostics"]["sigma_up_max"] == [None] * 6  # no factors, but ‖W‖₂ and ‖ΔW‖₂ are measured
    assert all(v > 0 for v in dense["diagnostics"]["weight_norm_max"])


@pytest.mark.slow
def test_a_run_continued_from_the_rung_equals_the_run_trained_straight(study, tmp_path, cache_dir):
    out, _, _ = study
    settings = smoke_settings()
    continued = json.loads((out / "runs" / "spectron_lr0.1_seed0_steps12.json").read_text())
    assert [s["stop_at"] for s in continued["segments"]] == [4, 12]  # stopped at the rung, then promoted
    data_dir, _ = prepare_data(settings, cache_dir)
    job = Job("spectron", 0.1, 0, 12)
    straight = run_segment(Segment(job, 12, "grid"), settings, data_dir, tmp_path / "runs", tmp_path / "ckpt")
    assert straight["curve"] == continued["curve"]  # bitwise: losses, grad norms and lrs of all 12 steps
    assert straight["final_loss"] == continued["final_loss"]


@pytest.mark.slow
def test_a_second_call_trains_nothing_and_an_interrupted_study_ends_the_same(study, tmp_path, cache_dir):
    out, result, _ = study
    settings = smoke_settings()
    again = run_study(settings, out, workers=0, cache_dir=cache_dir, log=lambda _: None)
    assert again["trained"] == []
    # Interrupted after 5 segments, then resumed: the same runs and the same numbers as the uninterrupted study.
    partial = run_study(settings, tmp_path, workers=0, cache_dir=cache_dir, max_segments=5, log=lambda _: None)
    assert len(partial["trained"]) == 5 and not partial["summary"]["complete"]
    rest = run_study(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)
    assert len(partial["trained"]) + len(rest["trained"]) == len(result["trained"])
    for key in ("variants", "rank_ablation", "equal_flops"):
        assert _losses(rest["summary"][key]) == _losses(result["summary"][key]), key


def _losses(tree):
    """The numbers of a summary section, without wall times."""
    if isinstance(tree, dict):
        return {k: _losses(v) for k, v in tree.items() if k not in ("wall_time_s", "tokens_per_s")}
    if isinstance(tree, list):
        return [_losses(v) for v in tree]
    return tree


@pytest.mark.slow
def test_a_record_lost_after_its_checkpoint_is_rebuilt_without_training(study, tmp_path, cache_dir):
    settings = dataclasses.replace(smoke_settings(), lr_grids={"spectron": (0.1,)})
    data_dir, _ = prepare_data(settings, cache_dir)
    segment = Segment(Job("spectron", 0.1, 0, 12), 4, "grid")
    first = run_segment(segment, settings, data_dir, tmp_path / "runs", tmp_path / "ckpt")
    (tmp_path / "runs" / f"{segment.job.id}.json").unlink()  # killed after the checkpoint, before the record
    rebuilt = run_segment(segment, settings, data_dir, tmp_path / "runs", tmp_path / "ckpt")
    assert rebuilt["curve"] == first["curve"] and rebuilt["final_loss"] == first["final_loss"]
    assert rebuilt["steps_done"] == 4


def test_planted_divergence_is_decided_by_the_guard(tmp_path, cache_dir):
    # AdamW at lr 1e30 overflows at once: the step guard stops the run at the first non-finite loss or gradient.
    settings = dataclasses.replace(smoke_settings(), lr_grids={"lowrank_adamw": (1e-3, 1e30)}, seeds=1, parts=("grid",))
    summary = run_study(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)["summary"]
    entry = summary["variants"]["lowrank_adamw"]
    runs = {run["lr"]: run for run in entry["grid"]}
    assert runs[1e30]["diverged"] and runs[1e30]["stop_reason"].startswith("NonFiniteTrainingError")
    assert runs[1e30]["steps_done"] < settings.rung_steps  # stopped there, not trained on
    assert entry["diverged"] == 1 and entry["best_lr"] == 1e-3 and entry["learning_rates"] == [1e-3, 1e30]
    assert "diverged at step" in (tmp_path / "results.md").read_text()


def _record(lr, rung_loss, final=None, diverged=False, steps_done=None, rung=4, steps=12):
    evals = {str(rung): rung_loss}
    if final is not None:
        evals[str(steps)] = final
    return {
        "lr": lr,
        "evals": evals,
        "final_loss": final if final is not None else rung_loss,
        "diverged": diverged,
        "steps_done": steps_done if steps_done is not None else (steps if final is not None else rung),
    }


def test_grid_extension_promotion_and_fallback_rules():
    settings = dataclasses.replace(
        smoke_settings(), lr_grids={"spectron": (0.01, 0.03, 0.1)}, promote_top=2, promote_margin=0.05,
        max_extensions=3,
    )  # fmt: skip
    plan = StudyPlan(settings, ["spectron"])
    done = {}

    def put(lr, *args, **kwargs):
        done[plan.grid_job("spectron", lr).id] = _record(lr, *args, **kwargs)

    assert [s.stop_at for s in plan.segments(done)] == [4, 4, 4]
    put(0.01, 5.0), put(0.03, 4.5), put(0.1, 4.8)
    assert plan.grid_lrs("spectron", done) == [0.01, 0.03, 0.1, 0.3]  # top < 10 × best: extended
    put(0.3, 4.52)
    assert plan.grid_lrs("spectron", done) == [0.01, 0.03, 0.1, 0.3]  # 0.3 ≥ 10 × 0.03: the edge is shown
    assert plan.rung_complete("spectron", done)
    # Top 2 (0.03, 0.3), within 0.05 of the best (0.3), and the largest surviving lr (0.3).
    assert plan.promoted("spectron", done) == [0.03, 0.3]
    put(0.3, 4.52, final=float("nan"), diverged=True, steps_done=9)  # diverges after the rung
    assert plan.promoted("spectron", done) == [0.03, 0.1, 0.3]  # falls back to the next largest lr
    put(0.03, 4.5, final=4.0), put(0.1, 4.8, final=4.05)
    assert plan.grid_final("spectron", done)
    assert plan.best_lr("spectron", done) == 0.03 and plan.top_stable_lr("spectron", done) == 0.1
    assert {(j.lr, j.seed) for j in plan.seed_jobs("spectron", done)} == {(0.03, 1), (0.1, 1)}
    assert {j.lr for j in plan.stress_jobs(done)} == {0.03, 0.09}
    assert plan.flops_steps("spectron") > settings.steps
    with pytest.raises(ValueError, match="Unknown variants"):
        StudyPlan(settings, ["sgd"])
    with pytest.raises(ValueError, match="No learning-rate grid"):
        StudyPlan(settings, ["renormalize_only"])


def test_extension_stops_at_the_first_divergence_and_at_max_extensions():
    settings = dataclasses.replace(smoke_settings(), lr_grids={"spectron": (0.01, 0.03)}, max_extensions=1)
    plan = StudyPlan(settings, ["spectron"])
    done = {plan.grid_job("spectron", lr).id: _record(lr, 4.0 + lr) for lr in (0.01, 0.03)}
    assert plan.grid_lrs("spectron", done) == [0.01, 0.03, 0.1]
    done[plan.grid_job("spectron", 0.1).id] = _record(0.1, 3.9)
    assert plan.grid_lrs("spectron", done) == [0.01, 0.03, 0.1]  # max_extensions reached
    settings = dataclasses.replace(settings, max_extensions=5)
    done = {plan.grid_job("spectron", 0.01).id: _record(0.01, 4.0),
            plan.grid_job("spectron", 0.03).id: _record(0.03, 9.0, diverged=True, steps_done=2)}  # fmt: skip
    assert StudyPlan(settings, ["spectron"]).grid_lrs("spectron", done) == [0.01, 0.03]


def test_lr_width_interpolates_between_measured_points_only():
    grid = [0.01, 0.03, 0.1, 0.3, 1.0]
    finals = {0.01: (4.5, False), 0.03: (4.0, False), 0.1: (4.05, False), 0.3: (4.3, False)}
    width = lr_width_decades(finals, grid, 0.1)
    # left: 4.0 → 4.5 over half a decade crosses 4.1 at 1/5 of it; right: 4.05 → 4.3 crosses at 1/5 past 0.1
    expected = (math.log10(0.1) + 0.2 * math.log10(3)) - (math.log10(0.03) - 0.2 * math.log10(3))
    assert width == pytest.approx(expected, abs=1e-3)
    assert lr_width_decades({0.03: (4.0, False), 0.1: (4.0, True)}, grid, 0.1) == 0.0  # a diverged neighbour
    assert lr_width_decades({0.1: (5.0, True)}, grid, 0.1) is None


def test_small_helpers():
    assert [next_half_decade(x) for x in (0.01, 0.03, 1.0, 3.0, 3e-4)] == [0.03, 0.1, 3.0, 10.0, 1e-3]
    assert Job("spectron", 0.05, 0, 8).id == "spectron_lr0.05_seed0_steps8"
    assert Job("spectron", 0.05, 1, 8, clip=False, rank_ratio=0.4).id == "spectron_lr0.05_seed1_steps8_noclip_rank0.4"
    assert is_done({"diverged": True, "steps_done": 2}, 12) and not is_done(None, 4)
    assert set(VARIANTS) == {
        "dense_adamw", "lowrank_adamw", "orthogonalize_only", "renormalize_only", "spectron", "dense_muon"
    }  # fmt: skip


def test_a_second_study_in_the_same_folder_is_refused(tmp_path, cache_dir):
    import hashlib

    from hf_lowrank.training.run_dir import OutputDirInUseError, RunLock

    settings = smoke_settings()
    key = hashlib.sha256(str(tmp_path.resolve()).encode()).hexdigest()[:8]
    holder = RunLock(cache_dir / f"checkpoints-{settings.fingerprint()}-{key}")
    holder.acquire()  # another study holds the folder
    try:
        with pytest.raises(OutputDirInUseError, match="Another stability study is writing"):
            run_study(settings, tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)
    finally:
        holder.release()
    assert not list((tmp_path / "runs").glob("*.json"))


def test_wall_time_counts_only_time_with_a_segment_training():
    """A study run over sessions days apart: its wall time is the union of the segments' intervals, not the span."""
    from hf_lowrank.experiments.report import _busy_time

    assert _busy_time([(0, 10), (5, 15), (100, 110), (102, 104)]) == 25
    assert _busy_time([]) == 0
