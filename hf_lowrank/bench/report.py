"""The benchmark's targets, their PASS/FAIL verdicts, and the markdown tables of a result."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    threshold: float
    higher_is_better: bool
    min_width: int = 0  # shapes narrower than this are reported but not judged

    def passes(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


TARGETS = (
    Target(
        "train_fraction_of_ideal",
        "factorized training reaches >= 95% of its FLOP-ideal speedup over dense (width >= 1024)",
        0.95,
        True,
        min_width=1024,
    ),
    Target(
        "train_fraction_of_ideal_compiled",
        "the same with forward and backward under torch.compile (width >= 1024)",
        0.95,
        True,
        min_width=1024,
    ),
    Target(
        "spectron_overhead",
        "Spectron adds <= 5% to a training step compared with AdamW (at the benchmark's micro-batch)",
        0.05,
        False,
    ),
    Target("memory_ratio", "peak training memory of factorized + Spectron <= 40% of dense + AdamW", 0.40, False),
    Target("generation_speedup", "greedy generation >= 1.3x dense (width >= 1024)", 1.3, True, min_width=1024),
)


def target_values(shape_result: dict) -> dict[str, float]:
    """The value each target judges, for one shape's results (missing measurements are left out)."""
    values = {
        "train_fraction_of_ideal": shape_result["training"]["fraction_of_ideal"],
        "spectron_overhead": shape_result["optimizer"]["spectron_overhead"],
    }
    if "training_compiled" in shape_result:
        values["train_fraction_of_ideal_compiled"] = shape_result["training_compiled"]["fraction_of_ideal"]
    if "memory" in shape_result:
        values["memory_ratio"] = shape_result["memory"]["peak_ratio"]
    if "generation" in shape_result:
        values["generation_speedup"] = shape_result["generation"]["speedup"]
    return values


def evaluate_targets(shape_results: list[dict]) -> list[dict]:
    """One verdict per target: PASS when every judged shape passes; per-shape values kept for the report."""
    verdicts = []
    for target in TARGETS:
        judged = [
            (r["shape"]["name"], target_values(r)[target.key])
            for r in shape_results
            if r["shape"]["hidden_size"] >= target.min_width and target.key in target_values(r)
        ]
        if not judged:
            continue
        verdicts.append(
            {
                "target": target.key,
                "text": target.text,
                "threshold": target.threshold,
                "values": dict(judged),
                "pass": all(target.passes(value) for _, value in judged),
            }
        )
    return verdicts


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(result: dict) -> str:
    """Tables of a benchmark result (the dict ``run_benchmark`` returns)."""
    shapes = result["shapes"]
    lines = ["### Training step (forward + backward + optimizer), tokens/s", ""]
    lines += [
        "| shape | tokens/step | dense + AdamW | factorized + AdamW | factorized + Spectron | speedup (IQR) | "
        "FLOP-ideal | % of ideal (IQR) | fwd+bwd speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in shapes:
        for mode, key in (("", "training"), (" (compiled)", "training_compiled")):
            if key not in r:
                continue
            t = r[key]
            spectron = t.get("factorized_spectron_tokens_per_s")
            lines.append(
                f"| {r['shape']['name']}{mode} | {t['tokens_per_step']} | {t['dense_tokens_per_s']:,.0f} | "
                f"{t['factorized_tokens_per_s']:,.0f} | {f'{spectron:,.0f}' if spectron else '-'} | "
                f"{t['speedup']:.2f}x ({_range(t['speedup_quartiles'], '.2f')}) | {t['ideal_speedup']:.2f}x | "
                f"{100 * t['fraction_of_ideal']:.0f}% ({_range([100 * q for q in t['fraction_of_ideal_quartiles']], '.0f')}) | "
                f"{t['speedup_forward_backward']:.2f}x |"
            )
    lines += ["", "### Optimizer step on the factorized model", ""]
    has_reference = "reference_spectron_step_s" in shapes[0]["optimizer"]
    header = "| shape | AdamW (fused) ms | Spectron ms | "
    header += "reference Spectron ms | batched speedup | " if has_reference else ""
    header += "Spectron share of step | overhead vs AdamW | at 131k tokens/step | tokens/step for 5% |"
    lines += [header, "|" + " --- |" + " ---: |" * (header.count("|") - 2)]
    for r in shapes:
        o = r["optimizer"]
        row = f"| {r['shape']['name']} | {1e3 * o['adamw_step_s']:.0f} | {1e3 * o['spectron_step_s']:.0f} | "
        if has_reference:
            row += f"{1e3 * o['reference_spectron_step_s']:.0f} | {o['batched_speedup_over_reference']:.2f}x | "
        row += (
            f"{100 * o['spectron_share_of_step']:.0f}% | +{100 * o['spectron_overhead']:.0f}% | "
            f"+{100 * o['spectron_overhead_at_reference_batch']:.2f}% | {o['tokens_per_step_for_5pct']:,.0f} |"
        )
        lines.append(row)
    if any("memory" in r for r in shapes):
        lines += ["", "### Training memory, MiB (peak = resident-set high-water mark over steady-state steps)", ""]
        lines += [
            "| shape | variant | weights | gradients | optimizer state | sum | peak | peak vs dense + AdamW |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in shapes:
            if "memory" not in r:
                continue
            m = r["memory"]
            dense_peak = m["variants"]["dense_adamw"]["peak_bytes"]
            for name, v in m["variants"].items():
                lines.append(
                    f"| {r['shape']['name']} | {name.replace('_', ' + ')} | {_mib(v['param_bytes'])} | "
                    f"{_mib(v['grad_bytes'])} | {_mib(v['optimizer_state_bytes'])} | {_mib(v['model_state_bytes'])} | "
                    f"{_mib(v['peak_bytes'])} | {100 * v['peak_bytes'] / dense_peak:.0f}% |"
                )
    if result.get("analytic_model_state"):
        lines += [
            "",
            "Weights + gradients + optimizer state of full-depth presets (32k vocabulary), from parameter counts:",
            "",
        ]
        lines += [
            "| preset | dense + AdamW, GiB | factorized + Spectron, GiB | ratio |",
            "| --- | ---: | ---: | ---: |",
        ]
        for row in result["analytic_model_state"]:
            lines.append(
                f"| {row['preset']} | {row['dense_adamw_bytes'] / 2**30:.2f} | "
                f"{row['factorized_spectron_bytes'] / 2**30:.2f} | {100 * row['ratio']:.0f}% |"
            )
    if any("generation" in r for r in shapes):
        lines += ["", "### Greedy generation with KV cache, batch 1, tokens/s", ""]
        lines += [
            "| shape | dense | factorized | speedup (IQR) | FLOP-ideal |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in shapes:
            if "generation" in r:
                g = r["generation"]
                lines.append(
                    f"| {r['shape']['name']} | {g['dense_tokens_per_s']:.1f} | {g['factorized_tokens_per_s']:.1f} | "
                    f"{g['speedup']:.2f}x ({_range(g['speedup_quartiles'], '.2f')}) | {g['ideal_speedup']:.2f}x |"
                )
    lines += ["", "### Targets", "", "| target | values | verdict |", "| --- | --- | --- |"]
    for v in result["targets"]:
        values = ", ".join(f"{name}: {_format_value(v['target'], x)}" for name, x in v["values"].items())
        lines.append(f"| {v['text']} | {values} | {'PASS' if v['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _range(pair, spec: str) -> str:
    return f"{pair[0]:{spec}}-{pair[1]:{spec}}"


def _format_value(key: str, value: float) -> str:
    if key in ("train_fraction_of_ideal", "train_fraction_of_ideal_compiled", "memory_ratio", "spectron_overhead"):
        return f"{100 * value:.0f}%"
    return f"{value:.2f}x"
