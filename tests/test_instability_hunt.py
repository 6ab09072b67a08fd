"""The instability hunt's tool: conditions as overrides of the stability study's setting (one factor at a time and
combined), what counts as stalled at unigram, bf16 autocast on the CPU, and the command end to end (resumable)."""

import dataclasses
import json
import shlex

import pytest

from hf_lowrank import cli
from hf_lowrank.experiments.instability import build_parser, command_line, run_hunt, settings_from_args
from hf_lowrank.experiments.instability_plan import (
    TUNED_LRS,
    Condition,
    HuntPlan,
    HuntSettings,
    condition_settings,
    smoke_hunt_settings,
)
from hf_lowrank.experiments.instability_report import results_markdown, run_outcome, summarize
from hf_lowrank.experiments.plan import Job, Segment, StudySettings
from hf_lowrank.experiments.runner import prepare_data, run_segment

E2E_CONDITIONS = ("baseline", "combined_10x")
E2E_VARIANTS = ("lowrank_adamw", "spectron")


# ------------------------------------------------------------------------------------------------ conditions
def test_each_condition_changes_its_factor_alone_and_the_combinations_change_them_all():
    plan = HuntPlan(HuntSettings())
    jobs = plan.jobs()
    assert len(jobs) >= 24 and min(job.steps for job in jobs) >= 1000
    assert len({job.id for job in jobs}) == len(jobs)
    baseline = plan.condition_settings("baseline")
    # The baseline is the stability study's setting (its steps come from the hunt).
    assert dataclasses.replace(baseline, steps=1500, rung_steps=375).fingerprint() == StudySettings().fingerprint()

    def changed(name):
        a, b = dataclasses.asdict(baseline), dataclasses.asdict(plan.condition_settings(name))
        return {k: b[k] for k in a if a[k] != b[k]}

    assert changed("no_warmup") == {"warmup_ratio": 0.0}
    assert changed("constant_lr") == {"lr_scheduler": "constant_with_warmup"}
    assert changed("bf16") == {"bf16": True}
    deep = changed("deep")["model_overrides"]
    assert (deep["num_hidden_layers"], deep["hidden_size"], deep["vocab_size"]) == (12, 128, 2048)
    for name in ("no_clip", "lr_3x", "lr_10x"):  # these change the job, not the settings
        assert changed(name) == {}
    combined = changed("combined_10x")
    assert {k: combined[k] for k in ("warmup_ratio", "lr_scheduler", "bf16")} == {
        "warmup_ratio": 0.0, "lr_scheduler": "constant_with_warmup", "bf16": True
    }  # fmt: skip
    assert combined["model_overrides"] == deep

    by_name = {c.name: c for c in plan.settings.conditions}
    for variant in plan.variants:
        assert plan.job(variant, by_name["baseline"]).lr == TUNED_LRS[variant]
        assert plan.job(variant, by_name["lr_3x"]).lr == pytest.approx(3 * TUNED_LRS[variant])
        assert plan.job(variant, by_name["combined_10x"]).lr == pytest.approx(10 * TUNED_LRS[variant])
        assert not plan.job(variant, by_name["no_clip"]).clip and not plan.job(variant, by_name["combined_3x"]).clip
        assert plan.job(variant, by_name["bf16"]).clip
    assert len({plan.condition_settings(c).fingerprint() for c in ("baseline", "deep", "bf16", "no_warmup")}) == 4
    assert Job("spectron", 0.01, 0, 1500).id == "spectron_lr0.01_seed0_steps1500"  # the stability study's ids


def test_the_regenerating_command_describes_the_same_hunt():
    flags = ["--out", "x", "--conditions", "deep", "bf16", "--variants", "spectron", "--steps", "2000", "--seeds", "2"]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert [c.name for c in settings.conditions] == ["deep", "bf16"] and settings.steps == 2000
    words = shlex.split(command_line(settings, "x"))
    assert words[:2] == ["hf-lowrank", "instability-hunt"]
    assert settings_from_args(build_parser().parse_args(words[2:])) == settings


def test_bad_conditions_are_refused():
    with pytest.raises(ValueError, match="overrides unknown settings"):
        condition_settings(StudySettings(), Condition("typo", "", {"warmup": 0}))
    with pytest.raises(ValueError, match="lowercase"):
        HuntPlan(dataclasses.replace(HuntSettings(), conditions=(Condition("No Clip", "", clip=False),)))
    with pytest.raises(ValueError, match="No tuned lr"):
        HuntPlan(dataclasses.replace(HuntSettings(), lrs={"spectron": 0.01}))
    with pytest.raises(ValueError, match="Control conditions"):
        HuntPlan(dataclasses.replace(HuntSettings(), control_conditions=("baseline", "lr_100x")))
    with pytest.raises(ValueError, match="the control \\(dense_adamw\\) is not among the variants"):
        HuntPlan(dataclasses.replace(HuntSettings(), variants=("spectron",), control_conditions=("baseline",)))


def test_the_control_can_be_kept_to_some_conditions():
    flags = ["--out", "x", "--control_conditions", "baseline", "combined_10x"]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert settings.control_conditions == ("baseline", "combined_10x")
    assert settings_from_args(build_parser().parse_args(shlex.split(command_line(settings, "x"))[2:])) == settings
    plan = HuntPlan(settings)
    jobs = plan.jobs()
    assert len(jobs) == 10 * 2 + 2  # both factorized variants everywhere, the control at two conditions
    assert sorted(job.tag for job in jobs if job.variant == "dense_adamw") == ["baseline", "combined_10x"]

    summary = summarize(plan, {}, {"unigram_loss": 6.0}, "hf-lowrank instability-hunt --out x")
    deep = summary["conditions"]["deep"]
    assert deep["not_in_plan"] == ["dense_adamw"] and list(deep["runs"]) == ["lowrank_adamw", "spectron"]
    assert summary["conditions"]["baseline"]["not_in_plan"] == [] and not summary["complete"]
    row = next(line for line in results_markdown(summary).splitlines() if line.startswith("| `deep`"))
    assert row.count("not trained yet") == 2 and row.endswith("not in this hunt (control conditions) |")


# ------------------------------------------------------------------------------------------------ outcomes
def _record(losses, final, *, diverged=False, sigma=(1.0, 3.0)):
    return {
        "id": "r", "variant": "lowrank_adamw", "lr": 1e-3, "seed": 0, "clip": True, "steps": len(losses),
        "steps_done": len(losses), "diverged": diverged, "stop_reason": None, "spikes": 0, "final_loss": final,
        "max_update_norm": 1.0, "wall_time_s": 1.0, "curve": {"loss": losses},
        "diagnostics": {"sigma_up_max": list(sigma), "sigma_down_max": [1.0, 1.0], "weight_norm_max": list(sigma)},
    }  # fmt: skip


def test_stalled_at_unigram_after_learning_is_told_from_never_learning_and_from_learning():
    def outcome(record):
        return run_outcome(record, unigram=6.4, learn_margin=0.5, stall_margin=0.25)

    rose_back = outcome(_record([6.5] * 10 + [4.0] * 40 + [6.4] * 50, final=6.3))
    assert rose_back["stalled"] == "rose back" and rose_back["learned"]
    assert rose_back["lowest_training_loss_smoothed"] == pytest.approx(4.0)
    assert rose_back["factor_norm_growth"] == pytest.approx(3.0)
    assert outcome(_record([6.5] * 100, final=6.39))["stalled"] == "never left"
    assert outcome(_record([6.5] * 10 + [4.0] * 90, final=4.1))["stalled"] is None  # learned and stayed there
    assert outcome(_record([6.5] * 100, final=6.39, sigma=(3.0, 1.0)))["stalled"] is None  # the norms shrank
    diverged = outcome(_record([6.5] * 100, final=float("nan"), diverged=True))
    assert diverged["stalled"] is None and diverged["diverged"]


def test_bf16_autocast_runs_on_the_cpu_and_changes_the_numbers(tmp_path, cache_dir):
    settings = dataclasses.replace(smoke_hunt_settings().base, lr_scheduler="constant_with_warmup", warmup_ratio=0.0)
    data_dir, _ = prepare_data(settings, cache_dir)
    curves = {}
    for bf16 in (False, True):
        segment = Segment(Job("spectron", 0.03, 0, 6, tag=f"bf16{bf16}".lower()), 6, "test")
        record = run_segment(segment, dataclasses.replace(settings, bf16=bf16), data_dir, tmp_path / "runs",
                             tmp_path / f"ckpt-{bf16}")  # fmt: skip
        assert record["lr"] == 0.03 and record["curve"]["lr"] == [0.03] * 6  # constant, no warm-up
        curves[bf16] = record["curve"]["loss"]
    # Deterministic on the CPU, so any difference is bf16's rounding; small, since weights stay float32.
    assert curves[True] != curves[False]
    assert curves[True] == pytest.approx(curves[False], abs=0.05)


# ------------------------------------------------------------------------------------------------ end to end
def _e2e_settings() -> HuntSettings:
    settings = smoke_hunt_settings()
    settings.conditions = tuple(c for c in settings.conditions if c.name in E2E_CONDITIONS)
    settings.variants = E2E_VARIANTS
    return settings


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hunt-cache")


@pytest.fixture(scope="module")
def hunt(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("hunt")
    args = ["instability-hunt", "--smoke", "--conditions", *E2E_CONDITIONS, "--variants", *E2E_VARIANTS,
            "--workers", "0", "--out", str(out), "--cache_dir", str(cache_dir)]  # fmt: skip
    assert cli.main(args) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_the_hunt_reports_every_condition_and_variant(hunt):
    out, summary = hunt
    assert summary["complete"] and list(summary["conditions"]) == list(E2E_CONDITIONS)
    for condition in summary["conditions"].values():
        for variant in E2E_VARIANTS:
            (run,) = condition["runs"][variant]
            assert run["steps_done"] == run["steps"] == 16
            for key in ("diverged", "spikes", "stalled", "final_loss", "max_update_norm", "factor_norm_growth"):
                assert key in run, key
            assert run["factor_norm_growth"] > 0  # factorized: the largest σ at the end over the first
    combined = summary["conditions"]["combined_10x"]
    assert combined["layers"] == 4 and combined["width"] == 32 and not combined["clip"]
    record = json.loads((out / "runs" / f"{combined['runs']['spectron'][0]['id']}.json").read_text())
    assert record["curve"]["lr"] == [0.1] * 16  # 10× the tuned 0.01, constant from the first step
    assert summary["totals"]["spectron"]["runs"] == 2
    results = (out / "results.md").read_text()
    assert "hf-lowrank instability-hunt --out" in results and "| `combined_10x`" in results
    for name in ("loss_curves.png", "weight_norms.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_a_second_call_trains_nothing_and_an_interrupted_hunt_ends_the_same(hunt, cache_dir, tmp_path):
    out, summary = hunt
    assert run_hunt(_e2e_settings(), out, workers=0, cache_dir=cache_dir, log=lambda _: None)["trained"] == []
    partial = run_hunt(_e2e_settings(), tmp_path, workers=0, cache_dir=cache_dir, max_segments=1, log=lambda _: None)
    assert len(partial["trained"]) == 1 and not partial["summary"]["complete"]
    rest = run_hunt(_e2e_settings(), tmp_path, workers=0, cache_dir=cache_dir, log=lambda _: None)
    assert len(rest["trained"]) == 3 and rest["summary"]["complete"]

    def numbers(s):
        return {n: {v: [{k: r[k] for k in r if k != "wall_time_s"} for r in runs] for v, runs in c["runs"].items()}
                for n, c in s["conditions"].items()}  # fmt: skip

    assert numbers(rest["summary"]) == numbers(summary)
