"""The scaling study's tool: the planning rules (lr carried from size to size, edge extension, seeds at the largest
size, steps at equal FLOPs), the fits, and the command end to end on the tiny preset (resumable, one line per error)."""

import copy
import dataclasses
import json
import math
import os
import shlex
import shutil

import pytest

from hf_lowrank import cli
from hf_lowrank.experiments.plan import Job, StudySettings, smoke_settings
from hf_lowrank.experiments.runner import prepare_data
from hf_lowrank.experiments.scaling import build_parser, command_line, run_scaling_study, settings_from_args
from hf_lowrank.experiments.scaling_fits import (
    loglog_fit,
    loss_vs_params_fit,
    optimal_size,
    optimal_size_exponent,
    saturating_fit,
)
from hf_lowrank.experiments.scaling_plan import ScalingPlan, ScalingSettings, smoke_scaling_settings
from hf_lowrank.experiments.scaling_report import non_embedding_parameters, results_markdown

# The end-to-end study: two variants (Spectron and one dense baseline, enough for the gap) keep it to ~30 tiny runs.
E2E_VARIANTS = ("dense_adamw", "spectron")


# ------------------------------------------------------------------------------------------------ planning rules
def _put(done, plan, variant, index, lr, loss, diverged=False):
    job = plan.job(variant, plan.sizes[index], plan.tuning_budget, lr)
    done[job.id] = {"final_loss": loss, "diverged": diverged, "steps_done": job.steps}


def test_the_lr_is_carried_from_size_to_size_and_extended_past_an_edge():
    plan = ScalingPlan(dataclasses.replace(smoke_scaling_settings(), variants=("spectron",), max_lr_extensions=2))
    done = {}
    assert plan.tuning_lrs("spectron", 0, done) == [0.003, 0.01, 0.03]  # around the stability study's best, 0.01
    assert plan.tuning_lrs("spectron", 1, done) is None  # waits for the smaller size's choice
    assert [(s.job.tag, s.part) for s in plan.segments(done)] == [("w32d2", "tuning")] * 3
    for lr, loss in ((0.003, 5.0), (0.01, 4.5), (0.03, 4.4)):
        _put(done, plan, "spectron", 0, lr, loss)
    assert plan.tuning_lrs("spectron", 0, done) == [0.003, 0.01, 0.03, 0.1]  # best at the top edge: one more point
    assert plan.chosen_lr("spectron", 0, done) is None  # not settled until 0.1 has trained
    _put(done, plan, "spectron", 0, 0.1, 4.6)
    assert plan.chosen_lr("spectron", 0, done) == 0.03
    assert plan.tuning_lrs("spectron", 1, done) == [0.01, 0.03, 0.1]  # centred on the previous size's choice

    # The best at the bottom edge, again and again: extended downward, at most max_lr_extensions times.
    for lr, loss in ((0.01, 4.0), (0.03, 4.2), (0.1, 4.3)):
        _put(done, plan, "spectron", 1, lr, loss)
    assert plan.tuning_lrs("spectron", 1, done) == [0.003, 0.01, 0.03, 0.1]
    _put(done, plan, "spectron", 1, 0.003, 3.9)
    _put(done, plan, "spectron", 1, 0.001, 3.8)
    assert plan.tuning_lrs("spectron", 1, done) == [0.001, 0.003, 0.01, 0.03, 0.1]
    assert plan.chosen_lr("spectron", 1, done) == 0.001

    # Every point diverged: step down; a diverged run is never chosen.
    for lr in (3e-4, 1e-3, 3e-3):
        _put(done, plan, "spectron", 2, lr, float("nan"), diverged=True)
    assert plan.tuning_lrs("spectron", 2, done) == [1e-4, 3e-4, 1e-3, 3e-3]
    _put(done, plan, "spectron", 2, 1e-4, 4.1)  # the best, at the bottom edge: the second extension goes below it
    assert plan.tuning_lrs("spectron", 2, done) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    _put(done, plan, "spectron", 2, 3e-5, 4.3)
    assert plan.chosen_lr("spectron", 2, done) == 1e-4


def test_seeds_at_the_largest_size_and_the_other_budgets_at_the_chosen_lr():
    plan = ScalingPlan(dataclasses.replace(smoke_scaling_settings(), variants=("dense_adamw",)))
    done = {}
    for index in range(3):
        centre = plan.centre("dense_adamw", index, done)
        for lr, loss in zip(plan.tuning_lrs("dense_adamw", index, done), (5.0, 4.0, 4.5)):
            _put(done, plan, "dense_adamw", index, lr, loss)
        assert plan.chosen_lr("dense_adamw", index, done) == centre  # the middle point won: no extension
    small = plan.chosen_jobs("dense_adamw", 0, done)
    largest = plan.chosen_jobs("dense_adamw", 2, done)
    assert [(j.seed, j.steps) for j in small] == [
        (0, plan.steps("dense_adamw", plan.sizes[0], b)) for b in plan.budgets
    ]
    assert sorted((j.seed, j.steps) for j in largest) == sorted(
        (seed, plan.steps("dense_adamw", plan.sizes[2], b)) for b in plan.budgets for seed in (0, 1)
    )
    pending = plan.segments(done)  # the tuning runs are done: the rest are the chosen-lr runs, longest first
    assert {s.part for s in pending} == {"budgets"} and len(pending) == 3 + 2  # one per size at the larger budget,
    costs = [plan.cost(s, done) for s in pending]  # plus the second seed at both budgets of the largest size
    assert costs == sorted(costs, reverse=True)
    assert plan.remaining_cost(done) == pytest.approx(sum(costs))


def test_steps_spend_each_budget_and_the_defaults_span_the_required_sizes():
    plan = ScalingPlan(ScalingSettings())
    for size in plan.sizes:
        for budget in plan.budgets:
            dense, factorized = plan.steps("dense_adamw", size, budget), plan.steps("spectron", size, budget)
            assert factorized > 1.5 * dense  # at equal FLOPs the factorized model trains more steps
            for variant, steps in (("dense_adamw", dense), ("spectron", factorized)):
                per_step = plan.flops_per_step(variant, size)
                assert abs(steps * per_step - budget) <= per_step / 2  # rounded to the nearest whole step
    assert set(plan.variants) == {"dense_adamw", "dense_muon", "spectron"}
    for variant in plan.variants:
        n = [non_embedding_parameters(plan, variant, size) for size in plan.sizes]
        assert len(n) >= 3 and n[-1] / n[0] >= 4
    assert len(plan.budgets) >= 2 and 2 <= plan.budgets[1] / plan.budgets[0] <= 4
    # Width 256 is the stability study's model, so its numbers can be read beside that study's.
    w256 = next(size for size in plan.sizes if size.width == 256)
    assert plan.size_settings(w256).model_config(True).to_dict() == StudySettings().model_config(True).to_dict()
    assert len({plan.size_settings(size).fingerprint() for size in plan.sizes}) == len(plan.sizes)
    assert len({plan.size_settings(size).data_fingerprint() for size in plan.sizes}) == 1  # one tokenized corpus
    # The stability study's records stay valid: its fingerprint and run ids are what they were.
    assert StudySettings().fingerprint() == "f3eec68e6784"
    assert Job("spectron", 0.01, 0, 1500).id == "spectron_lr0.01_seed0_steps1500"
    assert plan.job("spectron", w256, plan.budgets[0], 0.01).id == "spectron_w256d4_lr0.01_seed0_steps256"


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="not positive multiples of the head dimension"):
        ScalingPlan(dataclasses.replace(ScalingSettings(), widths=(128, 200)))
    with pytest.raises(ValueError, match="Budgets too small"):
        ScalingPlan(dataclasses.replace(ScalingSettings(), budgets=(1e11, 2e13)))
    with pytest.raises(ValueError, match="must not repeat"):
        ScalingPlan(dataclasses.replace(ScalingSettings(), budgets=(2e13, 2e13)))
    with pytest.raises(ValueError, match="Unknown variants"):
        ScalingPlan(dataclasses.replace(ScalingSettings(), variants=("sgd",)))


def test_the_regenerating_command_describes_the_same_study():
    flags = ["--out", "gpu", "--widths", "256", "512", "--layers", "8", "--budgets", "1e16", "3e16", "--bf16",
             "--device", "cuda", "--batch_size", "32", "--block_size", "512", "--train_files", "shards/*.jsonl"]  # fmt: skip
    settings = settings_from_args(build_parser().parse_args(flags))
    assert settings.base.model_overrides["max_position_embeddings"] == 512  # positions cover a block
    assert settings.base.data == {"train_files": ["shards/*.jsonl"]} and settings.base.bf16
    words = shlex.split(command_line(settings, "gpu"))
    assert words[:2] == ["hf-lowrank", "scaling-study"]
    assert settings_from_args(build_parser().parse_args(words[2:])) == settings
    smoke = settings_from_args(build_parser().parse_args(["--out", "x", "--smoke"]))
    assert settings_from_args(build_parser().parse_args(shlex.split(command_line(smoke, "x", smoke=True))[2:])) == smoke


def test_a_study_can_train_on_other_text(tmp_path):
    # Local files instead of the built-in corpus: their own tokenized folder and fingerprints; the stability
    # study's (no data source) are unchanged.
    text = tmp_path / "text"
    text.mkdir()
    stdlib = os.path.dirname(os.__file__)
    for name in ("argparse", "dataclasses", "fractions", "glob", "gzip", "shlex", "textwrap", "uuid"):
        shutil.copy(os.path.join(stdlib, f"{name}.py"), text / f"{name}.txt")
    settings = dataclasses.replace(smoke_settings(), data={"train_files": [str(text / "*.txt")]})
    assert settings.data_fingerprint() != smoke_settings().data_fingerprint()
    assert settings.fingerprint() != smoke_settings().fingerprint()
    assert StudySettings().data_fingerprint() == "ae41efc08942"  # the stability study's tokenized corpus
    data_dir, info = prepare_data(settings, tmp_path / "cache")
    assert data_dir.name == f"data-{settings.data_fingerprint()}"
    assert info["tokenizer_size"] == settings.model_config(dense=True).vocab_size and info["train_tokens"] > 0


# ------------------------------------------------------------------------------------------------ fits
def test_the_saturating_law_is_recovered_with_its_uncertainty():
    n = [1e5, 3e5, 1e6, 3e6, 1e7]
    exact = [2.0 + 40.0 * x**-0.3 for x in n]
    fit = saturating_fit(n, exact)
    assert fit["method"] == "saturating"
    assert (fit["E"], fit["A"], fit["alpha"]) == pytest.approx((2.0, 40.0, 0.3), rel=1e-3)
    noisy = [y + d for y, d in zip(exact, (0.01, -0.01, 0.005, -0.005, 0.01))]
    fit = saturating_fit(n, noisy)
    assert fit["alpha_stderr"] > 0 and abs(fit["alpha"] - 0.3) < 4 * fit["alpha_stderr"]
    # With 3 sizes the 3-parameter law is not fitted: the log-log line is, and the reason is given.
    fallback = loss_vs_params_fit(n[:3] + [n[2]], exact[:3] + [exact[2] + 0.01])
    assert fallback["method"] == "loglog" and "3 distinct sizes" in fallback["fallback"]
    assert fallback["dof"] == 2 and fallback["alpha_stderr"] > 0


def test_loglog_fit_and_its_reasons():
    fit = loglog_fit([1e5, 1e6, 1e7], [4.0 * x**-0.05 for x in (1e5, 1e6, 1e7)])
    assert fit["alpha"] == pytest.approx(0.05) and fit["A"] == pytest.approx(4.0)
    assert fit["alpha_stderr"] == pytest.approx(0.0, abs=1e-9)  # exact points: no spread
    assert loglog_fit([1e6, 1e6], [3.0, 3.1])["reason"].startswith("1 size(s)")
    assert loss_vs_params_fit([1e6, 2e6], [float("nan"), 3.0])["method"] is None  # non-finite points are dropped


def test_optimal_size_is_located_between_sizes_or_the_reason_is_given():
    n = [1e5, 1e6, 1e7]
    located = optimal_size(n + [1e7], [4.0, 3.5, 3.9, 3.95])  # a minimum inside: a parabola in log N
    assert located["best_size_n"] == 1e6 and 1e5 < located["n_opt"] < 1e7
    falling = optimal_size(n, [4.0, 3.6, 3.3])  # still falling at the largest size
    assert falling["n_opt"] is None and "above the largest" in falling["reason"]
    assert "needs 3" in optimal_size(n[:2], [4.0, 3.6])["reason"]
    exponent = optimal_size_exponent([1e13, 4e13], [1e6, 2e6])
    assert exponent["a"] == pytest.approx(0.5)
    missing = optimal_size_exponent([1e13, 4e13], [1e6, None])
    assert missing["a"] is None and "4e+13" in missing["reason"]


# ------------------------------------------------------------------------------------------------ end to end
def _e2e_args(out, cache_dir):
    return ["scaling-study", "--smoke", "--variants", *E2E_VARIANTS, "--workers", "0", "--out", str(out),
            "--cache_dir", str(cache_dir)]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scaling-cache")


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("scaling")
    assert cli.main(_e2e_args(out, cache_dir)) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_the_study_writes_losses_fits_gaps_and_plots(study):
    out, summary = study
    settings = smoke_scaling_settings()
    assert summary["complete"] and summary["budgets"] == list(settings.budgets)
    tags = [s["tag"] for s in summary["sizes"]]
    assert tags == ["w32d2", "w48d2", "w64d2"]
    for key in ("6e+08", "1.2e+09"):
        for variant in E2E_VARIANTS:
            entries = summary["final_loss"][key][variant]
            assert list(entries) == tags
            assert [len(entries[t]["final_loss"]) for t in tags] == [1, 1, 2]  # 2 seeds at the largest size only
            assert all(math.isfinite(x) for e in entries.values() for x in e["final_loss"])
            fit = summary["fits"][variant][key]
            assert fit["method"] == "loglog" and "3 distinct sizes" in fit["fallback"]  # 3 sizes: the log-log line
            assert fit["points"] == 4 and math.isfinite(fit["alpha"]) and fit["alpha_stderr"] is not None
            optimum = summary["compute_optimal"][variant]["per_budget"][key]
            assert optimum["n_opt"] is not None or optimum["reason"]
        assert list(summary["gap"][key]) == tags
        largest = summary["gap"][key]["w64d2"]
        assert largest["best_dense"] == "dense_adamw" and len(largest["gap_seeds"]) == 2
        assert largest["seed_spread"] is not None
    for variant in E2E_VARIANTS:
        exponent = summary["compute_optimal"][variant]["exponent"]
        assert exponent["a"] is not None or exponent["reason"]
        for index, tag in enumerate(tags):
            tuning = summary["lr_tuning"][variant][tag]
            assert tuning["settled"] and tuning["chosen_lr"] in [p["lr"] for p in tuning["points"]]
            assert len(tuning["points"]) >= 3
            if index:  # centred on the previous size's choice
                assert tuning["centre"] == summary["lr_tuning"][variant][tags[index - 1]]["chosen_lr"]
    # Factorized Spectron trains more steps than the dense model of its width at the same FLOPs.
    for size in summary["sizes"]:
        assert size["steps"]["spectron"]["6e+08"] > size["steps"]["dense_adamw"]["6e+08"]
    results = (out / "results.md").read_text()
    assert "hf-lowrank scaling-study --out" in results and "--smoke" in results
    for heading in ("## Final validation loss", "## Learning rates", "## Loss vs non-embedding parameters",
                    "## Compute-optimal size", "## Spectron against the better dense variant"):  # fmt: skip
        assert heading in results
    for name in ("loss_vs_flops.png", "loss_vs_params.png", "gap_vs_size.png"):
        assert (out / name).stat().st_size > 0, name
    # No smoke run repeats its data; a run that would is named under the loss table.
    repeated = copy.deepcopy(summary)  # the fixture's summary is shared with the next test
    entry = repeated["final_loss"]["6e+08"]["spectron"]["w32d2"]
    assert 0 < entry["epochs"] < 1 and "epochs" not in results
    entry["epochs"] = 2.5
    assert "low-rank + Spectron at width 32, 6e+08 FLOPs: 2.5 epochs" in results_markdown(repeated)


@pytest.mark.slow
def test_a_second_call_trains_nothing(study, cache_dir, capsys):
    out, summary = study
    records = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert cli.main(_e2e_args(out, cache_dir)) == 0
    assert "(0 segments trained by this call; complete)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == records
    again = json.loads((out / "summary.json").read_text())
    assert again["final_loss"] == summary["final_loss"] and again["fits"] == summary["fits"]
    # A size the next call leaves out keeps its records on disk and out of the report (with one seed, width 48
    # as the largest size needs no run it does not have).
    settings = dataclasses.replace(smoke_scaling_settings(), variants=E2E_VARIANTS, widths=(32, 48), seeds=1)
    result = run_scaling_study(settings, out, workers=0, cache_dir=cache_dir, log=lambda _: None)
    assert result["trained"] == [] and [s["tag"] for s in result["summary"]["sizes"]] == ["w32d2", "w48d2"]
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == records


def test_a_bad_width_is_one_line_and_exit_status_2(tmp_path, capsys):
    status = cli.main(["scaling-study", "--smoke", "--widths", "30", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("hf-lowrank scaling-study: error: Widths [30] are not positive multiples")
    assert not (tmp_path / "out").exists()  # refused before anything was written
