"""The benchmark's plumbing on a tiny shape (seconds): FLOP accounting, one run end to end, memory, targets.
Timings themselves are never asserted: on a shared CPU they are the benchmark's business, not the tests'."""

import json

import pytest

from hf_lowrank import count_parameters
from hf_lowrank.bench import TARGETS, evaluate_targets, markdown
from hf_lowrank.bench.flops import forward_flops_per_token, projection_flops, training_flops_per_token
from hf_lowrank.bench.memory import measure_here
from hf_lowrank.bench.runner import main, run_benchmark
from hf_lowrank.bench.suite import SMOKE_SHAPES, BenchShape
from hf_lowrank.bench.traffic import traffic_report

TINY = SMOKE_SHAPES[0]


def test_flops_follow_the_parameter_count():
    for factorized in (False, True):
        config = TINY.config(factorized)
        count = count_parameters(config)
        assert projection_flops(config) == 2 * count.projections  # no biases: 2 flops per weight per token
        head = 2 * config.hidden_size * config.vocab_size
        attention = 4 * 10 * config.hidden_size * config.num_hidden_layers  # heads * head_dim == hidden here
        assert forward_flops_per_token(config, context=10) == projection_flops(config) + head + attention
    dense, factorized = (training_flops_per_token(TINY.config(f), TINY.seq_len) for f in (False, True))
    assert (
        1
        < dense / factorized
        < count_parameters(TINY.config(False)).dense_projections / count_parameters(TINY.config(True)).projections
    )


def test_default_shapes_are_what_the_docs_say():
    shape = BenchShape(1024, 4)
    assert (shape.intermediate_size, shape.tokens_per_step, shape.config(True).rank_for("q_proj")) == (2816, 512, 256)
    assert BenchShape(2048, 2).intermediate_size == 5632 and BenchShape(512, 4).intermediate_size == 1408
    assert shape.config(False).is_dense and not shape.config(True).is_dense


@pytest.mark.slow
def test_a_run_end_to_end_reports_every_measurement_and_verdict():
    result = run_benchmark(
        SMOKE_SHAPES, repetitions=1, generation_repetitions=1, memory=False, compile=False, log=lambda _: None
    )
    (entry,) = result["shapes"]
    assert entry["training"]["ideal_speedup"] > 1.5
    assert entry["training"]["dense_tokens_per_s"] > 0 and entry["training"]["factorized_tokens_per_s"] > 0
    assert entry["optimizer"]["spectron_step_s"] > 0 and entry["optimizer"]["batched_speedup_over_reference"] > 0
    assert entry["generation"]["new_tokens"] == 16  # capped by the smoke shape's 32-token context
    json.dumps(result)  # the report is plain JSON
    # the smoke shape is narrower than 1024: only the width-independent targets are judged
    assert {v["target"] for v in result["targets"]} == {"spectron_overhead"}
    table = markdown(result)
    (verdict,) = result["targets"]
    assert "FLOP-ideal" in table
    assert f"| {verdict['text']} | " in table and table.rstrip().endswith("PASS |" if verdict["pass"] else "FAIL |")


def test_targets_judge_only_wide_enough_shapes():
    def shape_result(width, fraction):
        return {
            "shape": {"name": f"w{width}", "hidden_size": width},
            "training": {"fraction_of_ideal": fraction},
            "optimizer": {"spectron_overhead": 0.01},
            "generation": {"speedup": 1.5},
            "memory": {"peak_ratio": 0.5},
        }

    verdicts = {v["target"]: v for v in evaluate_targets([shape_result(512, 0.5), shape_result(1024, 0.97)])}
    assert verdicts["train_fraction_of_ideal"]["pass"] and verdicts["train_fraction_of_ideal"]["values"] == {
        "w1024": 0.97
    }
    assert verdicts["spectron_overhead"]["pass"] and not verdicts["memory_ratio"]["pass"]
    assert verdicts["generation_speedup"]["pass"]
    assert {t.key for t in TARGETS} >= set(verdicts)


@pytest.mark.parametrize("variant", ["dense_adamw", "factorized_spectron"])
def test_memory_accounting_counts_the_tensors(variant):
    result = measure_here(TINY, variant, steps=1)
    assert result["param_bytes"] == result["grad_bytes"] > 0
    # AdamW keeps two moments per weight; Spectron one momentum per factor (+ two AdamW moments elsewhere)
    ratio = result["optimizer_state_bytes"] / result["param_bytes"]
    assert ratio == pytest.approx(2.0, abs=0.01) if variant == "dense_adamw" else 1.0 < ratio < 2.0
    assert "peak_bytes" in result  # meaningful only in a fresh process (measure_in_subprocess), not in pytest's


@pytest.mark.slow
def test_the_script_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--no_memory", "--no_compile", "--no_reference", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["shapes"][0]["shape"]["hidden_size"] == TINY.hidden_size
    assert "Targets" in out.with_suffix(".md").read_text()


def test_the_script_prints_the_traffic_table_of_the_docs(capsys):
    assert main(["--traffic_report"]) == 0
    assert capsys.readouterr().out.strip() == traffic_report()
    assert "| 130m | 84 |" in traffic_report()


@pytest.mark.slow
def test_the_gpu_check_runs_every_phase_at_toy_sizes_on_cpu(tmp_path):
    from hf_lowrank.bench.gpu import run_gpu_check, summary_lines

    out = tmp_path / "gpu_check.json"
    result = run_gpu_check(out, cpu_smoke=True)
    saved = json.loads(out.read_text())
    assert saved["skipped"] == [] and len(saved["shapes"]) == 1
    assert {run["optimizer"] for run in saved["stability"]["runs"]} == {"spectron", "adamw"}
    assert all(run["max_update_norm"] > 0 and run["losses"] for run in saved["stability"]["runs"])
    assert len(summary_lines(result)) == 3
