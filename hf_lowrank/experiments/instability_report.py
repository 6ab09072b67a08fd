"""The instability hunt's report: ``summary.json``, ``results.md`` and the plots, from the run records alone."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..files import write_text_atomic
from .instability_plan import HuntPlan
from .plan import VARIANTS
from .report import _factor_growth, _finite_max, _growth, running_mean


# ------------------------------------------------------------------------------------------------ one run
def smoothed_min_and_last(losses: list[float], window: int) -> tuple[float | None, float | None]:
    """The lowest and the last of the ``window``-step running mean of a loss curve (non-finite steps left out)."""
    means = running_mean([x for x in losses if x is not None and math.isfinite(x)], window)
    return (min(means), means[-1]) if means else (None, None)


def run_outcome(record: dict, unigram: float, learn_margin: float, stall_margin: float) -> dict:
    """What happened to one run: diverged (the runner's rule), spikes, the final loss, the mechanism's norms, and
    whether it stalled at the unigram level: not diverged, a final validation loss within ``stall_margin`` of the
    unigram baseline (or above it), and growing norms (the factors' largest σ; dense: ‖W‖₂). ``stalled`` says
    ``"rose back"`` if the run had learned (smoothed training loss ``learn_margin`` below unigram) first, or
    ``"never left"``."""
    window = max(1, record["steps"] // 20)
    best_train, last_train = smoothed_min_and_last(record["curve"]["loss"], window)
    factor_growth = _factor_growth(record)
    weight_growth = _growth(record, "weight_norm_max")
    growth = factor_growth if factor_growth is not None else weight_growth
    learned = best_train is not None and best_train < unigram - learn_margin
    final = record["final_loss"]
    at_unigram = math.isfinite(final) and final >= unigram - stall_margin
    stalled = None
    if not record["diverged"] and at_unigram and growth is not None and growth > 1:
        stalled = "rose back" if learned else "never left"
    return {
        "id": record["id"],
        "variant": record["variant"],
        "lr": record["lr"],
        "seed": record["seed"],
        "clip": record["clip"],
        "steps": record["steps"],
        "steps_done": record["steps_done"],
        "diverged": record["diverged"],
        "stop_reason": record["stop_reason"],
        "spikes": record["spikes"],
        "final_loss": final,
        "lowest_training_loss_smoothed": best_train,
        "last_training_loss_smoothed": last_train,
        "learned": learned,
        "stalled": stalled,
        "max_update_norm": record["max_update_norm"],
        "factor_norm_growth": factor_growth,
        "weight_norm_growth": weight_growth,
        "max_weight_norm": _finite_max(record["diagnostics"].get("weight_norm_max", [])),
        "wall_time_s": record["wall_time_s"],
    }


# ------------------------------------------------------------------------------------------------ summary
def summarize(plan: HuntPlan, done: dict[str, dict], data_info: dict, command: str) -> dict:
    s, unigram = plan.settings, data_info["unigram_loss"]
    conditions = {}
    for name, condition in plan.conditions.items():
        runs, skipped = {}, []
        for variant in plan.variants:
            if not plan.trains(variant, condition):
                skipped.append(variant)
                continue
            jobs = [plan.job(variant, condition, seed) for seed in range(s.seeds)]
            records = [done[j.id] for j in jobs if j.id in done and _finished(done[j.id])]
            runs[variant] = [run_outcome(r, unigram, s.learn_margin, s.stall_margin) for r in records]
        settings = plan.condition_settings(name)
        conditions[name] = {
            "description": condition.description,
            "overrides": condition.settings,
            "lr_factor": condition.lr_factor,
            "clip": condition.clip,
            "fingerprint": settings.fingerprint(),
            "layers": settings.model_config(dense=True).num_hidden_layers,
            "width": settings.model_config(dense=True).hidden_size,
            "runs": runs,
            "not_in_plan": skipped,  # the control, where `control_conditions` leaves this condition out
        }
    return {
        "complete": plan.finished(done),
        "command": command,
        "unigram_loss": unigram,
        "steps": s.steps,
        "variants": {v: VARIANTS[v].label for v in plan.variants},
        "tuned_lrs": {v: s.lrs[v] for v in plan.variants},
        "conditions": conditions,
        "totals": totals(conditions, plan.variants),
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("base", "conditions")},
        "base_settings": dataclasses.asdict(s.base),
        "data": data_info,
        "runs": len(done),
        "worker_time_s": round(sum(seg["wall_s"] for r in done.values() for seg in r["segments"]), 1),
    }


def totals(conditions: dict, variants: list[str]) -> dict:
    """Per variant: runs trained, diverged, with a spike, stalled at unigram (and of those, after learning)."""
    out = {}
    for variant in variants:
        runs = [run for c in conditions.values() for run in c["runs"].get(variant, [])]
        out[variant] = {
            "runs": len(runs),
            "diverged": sum(r["diverged"] for r in runs),
            "spiked": sum(r["spikes"] > 0 for r in runs),
            "stalled": sum(r["stalled"] is not None for r in runs),
            "stalled_after_learning": sum(r["stalled"] == "rose back" for r in runs),
        }
    return out


def _finished(record: dict) -> bool:
    return record["diverged"] or record["steps_done"] >= record["steps"]


def write_report(out_dir: Path, plan: HuntPlan, done: dict, data_info: dict, command: str) -> dict:
    summary = summarize(plan, done, data_info, command)
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", results_markdown(summary))
    plot_curves(out_dir, done, summary, key="loss", name="loss_curves.png", title="training loss (smoothed)")
    plot_curves(out_dir, done, summary, key="weight_norm_max", name="weight_norms.png", title="largest ‖W‖₂")
    return summary


# ------------------------------------------------------------------------------------------------ markdown
def _num(x: float | None, fmt: str = ".3g") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, fmt)


def status(run: dict) -> str:
    """One word for a run: what the hunt is looking for first."""
    if run["diverged"]:
        return f"**diverged** at step {run['steps_done']}"
    if run["stalled"]:
        return f"**stalled** ({run['stalled']})"
    return f"{run['spikes']} spike(s)" if run["spikes"] else "trained"


def results_markdown(summary: dict) -> str:
    return "\n".join([*_header_lines(summary), *_matrix_table(summary), *_run_table(summary), *_totals_table(summary)])


def _header_lines(summary: dict) -> list[str]:
    base = summary["base_settings"]
    lrs = ", ".join(f"{summary['variants'][v]} {lr:g}" for v, lr in summary["tuned_lrs"].items())
    return [
        "# Instability hunt: results",
        "",
        "Generated by `hf-lowrank instability-hunt` from `runs/*.json` (method: `docs/instability.md`); every number "
        "is in `summary.json`."
        + ("" if summary["complete"] else " **The hunt is not complete yet: partial results.**"),
        "",
        "Regenerate (resumable; `--report_only` rewrites this report without training):",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"- Every run: {summary['steps']:,} steps × {base['batch_size'] * base['block_size']:,} tokens, "
        f"`{base['preset']}` preset with {base['model_overrides']} unless the condition says otherwise; tuned lrs: "
        f"{lrs}.",
        f"- Unigram baseline **{summary['unigram_loss']:.3f}** nats/token. Diverged: a NaN/inf loss or gradient, the "
        f"loss above the first step's for {base['divergence_patience']} steps, or a final validation loss above the "
        "first training loss. Stalled: not diverged, final validation loss within "
        f"{summary['settings']['stall_margin']} nats of the unigram baseline (or above) while the norms grew; "
        f"'rose back' if the smoothed training loss had been {summary['settings']['learn_margin']} nats below it.",
        f"- Compute: {summary['runs']} runs, {summary['worker_time_s'] / 3600:.2f} worker-hours.",
        "",
    ]


def _matrix_table(summary: dict) -> list[str]:
    variants = summary["variants"]
    lines = [
        "## Conditions × variants",
        "",
        "| condition | " + " | ".join(variants.values()) + " |",
        "| --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for name, c in summary["conditions"].items():
        cells = []
        for variant in variants:
            if variant in c.get("not_in_plan", ()):
                cells.append("not in this hunt (control conditions)")
                continue
            runs = c["runs"][variant]
            cells.append("; ".join(f"{status(r)}, {_num(r['final_loss'], '.3f')}" for r in runs) or "not trained yet")
        lines.append(f"| `{name}`: {c['description']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _run_table(summary: dict) -> list[str]:
    lines = [
        "## Every run",
        "",
        "Factor-norm growth: the largest σ(up) or σ(down) over the layers at the end over its first measurement; "
        "‖W‖₂ growth the same for the largest weight (for dense models the only one).",
        "",
        "| condition | variant | lr | clip | diverged | spikes | stalled | final loss | lowest training loss "
        "| max ‖ΔW‖₂ | factor-norm growth | ‖W‖₂ growth |",
        "| --- | --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in summary["conditions"].items():
        for variant, runs in c["runs"].items():
            for r in runs:
                diverged = f"at step {r['steps_done']}" if r["diverged"] else "no"
                lines.append(
                    f"| `{name}` | {summary['variants'][variant]} | {r['lr']:g} | {'yes' if r['clip'] else 'no'} | "
                    f"{diverged} | {r['spikes']} | {r['stalled'] or 'no'} | {_num(r['final_loss'], '.3f')} | "
                    f"{_num(r['lowest_training_loss_smoothed'], '.3f')} | {_num(r['max_update_norm'])} | "
                    f"{_num(r['factor_norm_growth'], '.2f')} | {_num(r['weight_norm_growth'], '.2f')} |"
                )
    return [*lines, ""]


def _totals_table(summary: dict) -> list[str]:
    lines = [
        "## Totals",
        "",
        "| variant | runs | diverged | spiked | stalled at unigram | of which after learning |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, t in summary["totals"].items():
        lines.append(
            f"| {summary['variants'][variant]} | {t['runs']} | {t['diverged']} | {t['spiked']} | {t['stalled']} | "
            f"{t['stalled_after_learning']} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ plots
def plot_curves(out_dir: Path, done: dict, summary: dict, *, key: str, name: str, title: str) -> None:
    """One panel per condition, one line per variant: the training loss (``key="loss"``) or a diagnostics curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = summary["conditions"]
    cols = min(5, len(conditions))
    rows = math.ceil(len(conditions) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(VARIANTS)}
    for ax, (cname, c) in zip(axes.flat, conditions.items()):
        for variant, runs in c["runs"].items():
            for r in runs[:1]:  # the first seed
                record = done[r["id"]]
                if key == "loss":
                    steps, values = record["curve"]["step"], record["curve"]["loss"]
                    values = running_mean(values, max(1, len(values) // 50))
                else:
                    steps, values = record["diagnostics"]["step"], record["diagnostics"][key]
                ax.plot(
                    steps, values, color=colors[variant], lw=1, label=f"{summary['variants'][variant]}, lr {r['lr']:g}"
                )
        if key == "loss":
            ax.axhline(summary["unigram_loss"], color="gray", ls=":")
            ax.set_ylim(top=summary["unigram_loss"] + 1)
        else:
            ax.set_yscale("log")
        ax.set_title(cname, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(conditions) :]:
        ax.axis("off")
    fig.suptitle(f"{title} per condition (first seed; dotted: unigram baseline)")
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
