"""The scaling study's report: ``summary.json``, ``results.md`` and the plots, from the run records alone (so
``--report_only`` regenerates them without training). One function per section of the summary, per table and
per figure."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from ..configuration_lowrank import count_parameters
from ..files import write_text_atomic
from .plan import VARIANTS
from .report import running_mean
from .scaling_fits import loss_vs_params_fit, optimal_size, optimal_size_exponent
from .scaling_plan import ScalingPlan

GAP_VARIANT = "spectron"
DENSE_VARIANTS = ("dense_adamw", "dense_muon")  # the gap is to the better of these at each size and budget


def budget_key(budget: float) -> str:
    return f"{budget:.3g}"


# ------------------------------------------------------------------------------------------------ summary
def summarize(plan: ScalingPlan, done: dict[str, dict], data_info: dict, command: str) -> dict:
    """The ``summary.json`` payload."""
    finals = final_losses(plan, done, data_info["train_tokens"])
    return {
        "complete": plan.finished(done),
        "command": command,
        "unigram_loss": data_info["unigram_loss"],
        "budgets": plan.budgets,
        "tuning_budget": plan.tuning_budget,
        "variants": {name: VARIANTS[name].label for name in plan.variants},
        "sizes": size_table(plan),
        "lr_tuning": lr_tuning(plan, done),
        "final_loss": finals,
        "fits": fits(plan, finals),
        "compute_optimal": compute_optimal(plan, finals),
        "gap": gaps(plan, finals),
        # The study's own settings, and the base every size's settings derive from (each fingerprint in `sizes`).
        "settings": {k: v for k, v in dataclasses.asdict(plan.settings).items() if k != "base"},
        "base_settings": dataclasses.asdict(plan.settings.base),
        "data": data_info,
        "runs": len(done),
        "worker_time_s": round(sum(seg["wall_s"] for r in done.values() for seg in r["segments"]), 1),
    }


def non_embedding_parameters(plan: ScalingPlan, variant: str, size) -> int:
    """Projections + norms of ``variant``'s model at ``size`` (factorized for the low-rank variants)."""
    counts = count_parameters(plan.size_settings(size).model_config(VARIANTS[variant].dense))
    return counts.projections + counts.norms


def size_table(plan: ScalingPlan) -> list[dict]:
    out = []
    for size in plan.sizes:
        settings = plan.size_settings(size)
        factorized, dense = (
            count_parameters(settings.model_config(False)),
            count_parameters(settings.model_config(True)),
        )
        out.append(
            {
                "tag": size.tag,
                "width": size.width,
                "layers": size.layers,
                "heads": size.heads,
                "intermediate": size.intermediate,
                "rank": settings.model_config(False).rank_for("q_proj"),
                "non_embedding_parameters": {v: non_embedding_parameters(plan, v, size) for v in plan.variants},
                "embedding_parameters": dense.embeddings,
                "parameters": {"factorized": factorized.total, "dense": dense.total},
                "training_flops_per_token": {
                    "factorized": settings.flops_per_token(False),
                    "dense": settings.flops_per_token(True),
                },  # fmt: skip
                "steps": {v: {budget_key(b): plan.steps(v, size, b) for b in plan.budgets} for v in plan.variants},
                "fingerprint": settings.fingerprint(),
            }
        )
    return out


def lr_tuning(plan: ScalingPlan, done: dict) -> dict:
    """Per variant and size: the centre, every point tried with its final loss, and the chosen lr."""
    out = {}
    for variant in plan.variants:
        out[variant] = {}
        for index, size in enumerate(plan.sizes):
            lrs = plan.tuning_lrs(variant, index, done) or []
            points = []
            for lr in lrs:
                record = done.get(plan.job(variant, size, plan.tuning_budget, lr).id)
                finished = record is not None and (record["diverged"] or record["steps_done"] >= record["steps"])
                points.append(
                    {
                        "lr": lr,
                        "final_loss": record["final_loss"] if finished else None,
                        "diverged": bool(record and record["diverged"]),
                        "trained": finished,
                    }  # fmt: skip
                )
            out[variant][size.tag] = {
                "centre": plan.centre(variant, index, done),
                "points": points,
                "chosen_lr": plan.chosen_lr(variant, index, done),
                "settled": plan.tuning_finals(variant, index, done) is not None,
            }
    return out


def final_losses(plan: ScalingPlan, done: dict, train_tokens: int) -> dict:
    """Per budget, variant and size: the runs at the chosen lr (every seed trained so far). ``epochs`` is the
    run's tokens over the training split's: above 1, the run saw some of its data again."""
    out = {}
    for budget in plan.budgets:
        out[budget_key(budget)] = {}
        for variant in plan.variants:
            entries = {}
            for index, size in enumerate(plan.sizes):
                lr = plan.chosen_lr(variant, index, done)
                if lr is None:
                    continue
                jobs = [plan.job(variant, size, budget, lr, seed) for seed in range(plan.seeds_at(index))]
                runs = [done[j.id] for j in jobs if j.id in done and _finished(done[j.id])]
                if not runs:
                    continue
                losses = [r["final_loss"] for r in runs]
                entries[size.tag] = {
                    "lr": lr,
                    "n": non_embedding_parameters(plan, variant, size),
                    "steps": jobs[0].steps,
                    "tokens": jobs[0].steps * plan.size_settings(size).tokens_per_step,
                    "epochs": jobs[0].steps * plan.size_settings(size).tokens_per_step / train_tokens,
                    "training_flops": jobs[0].steps * plan.flops_per_step(variant, size),
                    "seeds": [r["seed"] for r in runs],
                    "final_loss": losses,
                    "mean": _mean(losses),
                    "seed_spread": _half_range(losses),
                    "diverged": [r["diverged"] for r in runs],
                    "spikes": [r["spikes"] for r in runs],
                    "max_update_norm": [r["max_update_norm"] for r in runs],
                    "run_ids": [r["id"] for r in runs],
                }
            out[budget_key(budget)][variant] = entries
    return out


def fits(plan: ScalingPlan, finals: dict) -> dict:
    """Per variant and budget: loss vs non-embedding parameters N, every seed a point (diverged runs left out)."""
    out = {}
    for variant in plan.variants:
        out[variant] = {}
        for key, by_variant in finals.items():
            n, loss = _points(by_variant.get(variant, {}))
            out[variant][key] = loss_vs_params_fit(n, loss)
    return out


def compute_optimal(plan: ScalingPlan, finals: dict) -> dict:
    """Per variant: the size with the lowest loss at each budget, N_opt where it can be located between sizes, and
    the exponent a of N_opt ∝ C^a where two or more budgets locate it."""
    out = {}
    for variant in plan.variants:
        per_budget = {key: optimal_size(*_points(by_variant.get(variant, {}))) for key, by_variant in finals.items()}
        exponent = optimal_size_exponent(plan.budgets, [per_budget[budget_key(b)]["n_opt"] for b in plan.budgets])
        out[variant] = {"per_budget": per_budget, "exponent": exponent}
    return out


def gaps(plan: ScalingPlan, finals: dict) -> dict:
    """Per budget and size: Spectron's final loss minus the better dense variant's (negative: Spectron lower).
    ``gap_seeds`` pairs the seeds where both have several (else each seed against the other side's mean), and
    ``seed_spread`` is half their range."""
    dense = [v for v in DENSE_VARIANTS if v in plan.variants]
    if GAP_VARIANT not in plan.variants or not dense:
        return {"reason": f"needs {GAP_VARIANT} and one of {list(DENSE_VARIANTS)} among the variants trained."}
    out = {}
    for key, by_variant in finals.items():
        out[key] = {}
        for size in plan.sizes:
            ours = _alive(by_variant.get(GAP_VARIANT, {}).get(size.tag))
            theirs = {v: _alive(by_variant.get(v, {}).get(size.tag)) for v in dense}
            theirs = {v: losses for v, losses in theirs.items() if losses}
            if not ours or not theirs:
                continue
            best = min(theirs, key=lambda v: statistics.fmean(theirs[v]))
            reference = theirs[best]
            if len(ours) > 1 and len(reference) > 1:
                gap_seeds = [a - b for a, b in zip(ours, reference)]
            elif len(ours) > 1:
                gap_seeds = [a - statistics.fmean(reference) for a in ours]
            else:
                gap_seeds = [statistics.fmean(ours) - b for b in reference]
            out[key][size.tag] = {
                "width": size.width,
                "best_dense": best,
                "gap": statistics.fmean(ours) - statistics.fmean(reference),
                "gap_seeds": gap_seeds,
                "seed_spread": _half_range(gap_seeds),
                GAP_VARIANT: ours,
                "dense": reference,
            }
    return out


def _finished(record: dict) -> bool:
    return record["diverged"] or record["steps_done"] >= record["steps"]


def _alive(entry: dict | None) -> list[float]:
    """Final losses of the runs of one entry that neither diverged nor ended non-finite."""
    if not entry:
        return []
    return [x for x, bad in zip(entry["final_loss"], entry["diverged"]) if not bad and math.isfinite(x)]


def _points(entries: dict) -> tuple[list[float], list[float]]:
    n, loss = [], []
    for entry in entries.values():
        for x in _alive(entry):
            n.append(entry["n"])
            loss.append(x)
    return n, loss


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _half_range(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return (max(finite) - min(finite)) / 2 if len(finite) > 1 else None


def write_report(out_dir: Path, plan: ScalingPlan, done: dict, data_info: dict, command: str) -> dict:
    summary = summarize(plan, done, data_info, command)
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", results_markdown(summary))
    plot_loss_vs_flops(out_dir, plan, done, summary)
    plot_loss_vs_params(out_dir, summary)
    plot_gap_vs_size(out_dir, summary)
    return summary


# ------------------------------------------------------------------------------------------------ markdown
def _loss(x: float | None) -> str:
    return "—" if x is None else ("non-finite" if not math.isfinite(x) else f"{x:.3f}")


def _seeds(losses: list[float]) -> str:
    if not losses:
        return "—"
    if len(losses) == 1:
        return _loss(losses[0])
    return f"{statistics.fmean(losses):.3f} ± {(max(losses) - min(losses)) / 2:.3f}"


def _pm(value: float | None, error: float | None, fmt: str = ".3g") -> str:
    if value is None:
        return "—"
    return format(value, fmt) + ("" if error is None else f" ± {format(error, fmt.lstrip('+'))}")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def results_markdown(summary: dict) -> str:
    return "\n".join(
        [
            *_header_lines(summary),
            *_loss_table(summary),
            *_tuning_table(summary),
            *_fit_table(summary),
            *_optimal_table(summary),
            *_gap_table(summary),
            "",
        ]
    )


def _header_lines(summary: dict) -> list[str]:
    base, data = summary["base_settings"], summary["data"]
    sizes = ", ".join(
        f"width {s['width']} ({s['layers']} layers, {s['heads']} heads, MLP {s['intermediate']}, rank {s['rank']})"
        for s in summary["sizes"]
    )
    return [
        "# Scaling study: results",
        "",
        "Generated by `hf-lowrank scaling-study` from `runs/*.json` (method: `docs/scaling.md`); every number is in "
        "`summary.json`." + ("" if summary["complete"] else " **The study is not complete yet: partial results.**"),
        "",
        "Regenerate (resumable; `--report_only` rewrites this report without training):",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"- Sizes: {sizes}; `{base['preset']}` preset otherwise, vocabulary {data['tokenizer_size']:,}.",
        f"- Budgets (training FLOPs per run): {', '.join(f'{b:.3g}' for b in summary['budgets'])}; "
        f"{base['batch_size']} × {base['block_size']} tokens per step; {base['warmup_ratio']:.0%} warm-up, "
        f"{base['lr_scheduler']} schedule, clipping {base['max_grad_norm']}. lrs tuned at "
        f"{summary['tuning_budget']:.3g}.",
        f"- Data: the built-in corpus, {data['train_tokens']:,} training tokens, validation on "
        f"{data['validation_tokens']:,} tokens; unigram baseline **{summary['unigram_loss']:.3f}** nats/token.",
        f"- Compute: {summary['runs']} runs, {summary['worker_time_s'] / 3600:.2f} worker-hours.",
        "",
    ]


def _loss_table(summary: dict) -> list[str]:
    budgets = list(summary["final_loss"])
    lines = [
        "## Final validation loss",
        "",
        "At each (variant, size)'s chosen lr; ± is half the range of the seeds (the largest size trains several).",
        "",
        "| variant | width | non-embedding N | lr | " + " | ".join(f"{b} FLOPs: steps, loss" for b in budgets) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for variant, label in summary["variants"].items():
        for size in summary["sizes"]:
            cells, lr = [], None
            for key in budgets:
                entry = summary["final_loss"][key].get(variant, {}).get(size["tag"])
                if entry is None:
                    cells.append(f"{size['steps'][variant][key]:,}, —")
                    continue
                lr = entry["lr"]
                diverged = " (diverged)" if any(entry["diverged"]) else ""
                cells.append(f"{entry['steps']:,}, {_seeds(entry['final_loss'])}{diverged}")
            n = size["non_embedding_parameters"][variant]
            lines.append(
                f"| {label} | {size['width']} | {_millions(n)} | {'—' if lr is None else f'{lr:g}'} | "
                + " | ".join(cells) + " |"
            )  # fmt: skip
    return [*lines, "", *_repetition_note(summary)]


def _repetition_note(summary: dict) -> list[str]:
    """Name the runs that trained on more tokens than the training split holds (they repeated data)."""
    widths = {size["tag"]: size["width"] for size in summary["sizes"]}
    repeated = [
        f"{summary['variants'][variant]} at width {widths[tag]}, {key} FLOPs: "
        f"{entry['epochs']:.1f} epochs"
        for key, by_variant in summary["final_loss"].items() for variant, entries in by_variant.items()
        for tag, entry in entries.items() if entry["epochs"] > 1
    ]  # fmt: skip
    if not repeated:
        return []
    return [
        f"Runs longer than the {summary['data']['train_tokens']:,}-token training split repeat it: "
        + "; ".join(repeated) + ".",
        "",
    ]  # fmt: skip


def _tuning_table(summary: dict) -> list[str]:
    lines = [
        "## Learning rates",
        "",
        f"Tuned at {summary['tuning_budget']:.3g} FLOPs around the centre (the previous size's choice); "
        "final validation loss per lr, the chosen one in bold.",
        "",
        "| variant | width | centre | lr: final loss | chosen |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for variant, label in summary["variants"].items():
        for size in summary["sizes"]:
            t = summary["lr_tuning"][variant][size["tag"]]
            points = []
            for p in t["points"]:
                text = "diverged" if p["diverged"] else _loss(p["final_loss"]) if p["trained"] else "not trained yet"
                text = f"{p['lr']:g}: {text}"
                points.append(f"**{text}**" if p["lr"] == t["chosen_lr"] else text)
            chosen = "—" if t["chosen_lr"] is None else f"{t['chosen_lr']:g}"
            centre = "waits for the previous size" if t["centre"] is None else f"{t['centre']:g}"
            lines.append(f"| {label} | {size['width']} | {centre} | {'; '.join(points) or '—'} | {chosen} |")
    return [*lines, ""]


def _fit_table(summary: dict) -> list[str]:
    lines = [
        "## Loss vs non-embedding parameters",
        "",
        "Least squares over every run (seeds as separate points); ± is the standard error from the fit's covariance.",
        "`loglog`: L = A·N^(−α), the local slope over the sizes trained (used when there are too few sizes for "
        "`saturating`: L = E + A·N^(−α)).",
        "",
        "| variant | budget | method | α | E | A | points (sizes), dof | rms residual | note |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for variant, label in summary["variants"].items():
        for key, fit in summary["fits"][variant].items():
            if fit["method"] is None:
                lines.append(f"| {label} | {key} | — | — | — | — | — | — | {fit['reason']} |")
                continue
            e = _pm(fit.get("E"), fit.get("E_stderr"), ".3f") if fit["method"] == "saturating" else "—"
            lines.append(
                f"| {label} | {key} | {fit['method']} | {_pm(fit['alpha'], fit['alpha_stderr'])} | {e} | "
                f"{fit['A']:.3g} | {fit['points']} ({fit['distinct_sizes']}), {fit['dof']} | "
                f"{fit['rms_residual']:.3g} | {fit.get('fallback', '')} |"
            )
    return [*lines, ""]


def _optimal_table(summary: dict) -> list[str]:
    lines = [
        "## Compute-optimal size",
        "",
        "Per budget, the size with the lowest mean loss and N_opt, the minimum of a parabola in log N through the "
        "sizes' mean losses (only where it is a minimum between the sizes trained); a in N_opt ∝ C^a from the "
        "budgets that locate N_opt.",
        "",
        "| variant | budget | lowest loss at N | N_opt | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for variant, label in summary["variants"].items():
        entry = summary["compute_optimal"][variant]
        for key, o in entry["per_budget"].items():
            best = "—" if o["best_size_n"] is None else _millions(o["best_size_n"])
            n_opt = "—" if o["n_opt"] is None else _millions(o["n_opt"])
            lines.append(f"| {label} | {key} | {best} | {n_opt} | {o.get('reason', '')} |")
    lines += ["", "| variant | a in N_opt ∝ C^a |", "| --- | --- |"]
    for variant, label in summary["variants"].items():
        e = summary["compute_optimal"][variant]["exponent"]
        lines.append(f"| {label} | {_pm(e['a'], e.get('a_stderr')) if e['a'] is not None else e['reason']} |")
    return [*lines, ""]


def _gap_table(summary: dict) -> list[str]:
    lines = ["## Spectron against the better dense variant", ""]
    if "reason" in summary["gap"]:
        return [*lines, f"Not computed: {summary['gap']['reason']}", ""]
    lines += [
        "Spectron's final loss minus the better of dense AdamW and dense Muon at the same width and training FLOPs "
        "(negative: Spectron lower); ± is half the range of the per-seed gaps.",
        "",
        "| budget | width | better dense | gap (nats) | Spectron | dense |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for key, by_size in summary["gap"].items():
        for g in by_size.values():
            lines.append(
                f"| {key} | {g['width']} | {summary['variants'][g['best_dense']]} | "
                f"{_pm(g['gap'], g['seed_spread'], '+.3f')} | {_seeds(g[GAP_VARIANT])} | {_seeds(g['dense'])} |"
            )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_flops(out_dir: Path, plan: ScalingPlan, done: dict, summary: dict) -> None:
    """Training loss against training FLOPs spent, one panel per variant, one colour per size, one line style per
    budget; the final validation losses as dots."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plan.variants), figsize=(6 * len(plan.variants), 4.8), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    colors = {size.tag: plt.cm.viridis(i / max(1, len(plan.sizes) - 1)) for i, size in enumerate(plan.sizes)}
    styles = ["-", "--", ":", "-."]
    unigram = summary["unigram_loss"]
    for ax, variant in zip(axes[0], plan.variants):
        for b, key in enumerate(summary["final_loss"]):
            for tag, entry in summary["final_loss"][key].get(variant, {}).items():
                record = done[entry["run_ids"][0]]
                per_step = entry["training_flops"] / entry["steps"]
                steps, loss = record["curve"]["step"], record["curve"]["loss"]
                width = next(s["width"] for s in summary["sizes"] if s["tag"] == tag)
                ax.plot([per_step * x for x in steps], running_mean(loss, max(1, len(loss) // 50)), lw=1,
                        ls=styles[b % len(styles)], color=colors[tag],
                        label=f"width {width}, {key} FLOPs, lr {entry['lr']:g}")  # fmt: skip
                ax.plot([entry["training_flops"]] * len(entry["final_loss"]), entry["final_loss"], "o",
                        color=colors[tag], ms=4)  # fmt: skip
        ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="loss (nats/token)", title=VARIANTS[variant].label)
        ax.set_ylim(top=unigram + 0.5)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("training loss (smoothed) vs FLOPs at the chosen lr; dots: final validation loss")
    fig.savefig(out_dir / "loss_vs_flops.png", dpi=110)
    plt.close(fig)


def plot_loss_vs_params(out_dir: Path, summary: dict) -> None:
    """Final loss against non-embedding parameters, one panel per budget, with each variant's fitted curve."""
    plt = _pyplot()
    keys = list(summary["final_loss"])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.8), squeeze=False, constrained_layout=True)
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(VARIANTS)}
    for ax, key in zip(axes[0], keys):
        for variant, label in summary["variants"].items():
            entries = summary["final_loss"][key].get(variant, {})
            points = [(e["n"], x) for e in entries.values() for x in _alive(e)]
            if not points:
                continue
            ax.plot(*zip(*points), "o", color=colors[variant], label=label)
            fit = summary["fits"][variant][key]
            if fit["method"] is not None:
                ns = sorted({n for n, _ in points})
                grid = [ns[0] * (ns[-1] / ns[0]) ** (i / 50) for i in range(51)]
                e = fit.get("E", 0.0) if fit["method"] == "saturating" else 0.0
                ax.plot(grid, [e + fit["A"] * n ** -fit["alpha"] for n in grid], color=colors[variant], lw=1,
                        label=f"{fit['method']}: α = {fit['alpha']:.3g}")  # fmt: skip
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss",
               title=f"{key} training FLOPs")  # fmt: skip
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.savefig(out_dir / "loss_vs_params.png", dpi=110)
    plt.close(fig)


def plot_gap_vs_size(out_dir: Path, summary: dict) -> None:
    """Spectron minus the better dense variant against width, one line per budget, seed spread as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    if "reason" not in summary["gap"]:
        for key, by_size in summary["gap"].items():
            rows = sorted(by_size.values(), key=lambda g: g["width"])
            if rows:
                ax.errorbar([g["width"] for g in rows], [g["gap"] for g in rows],
                            yerr=[g["seed_spread"] or 0.0 for g in rows], marker="o", capsize=3,
                            label=f"{key} training FLOPs")  # fmt: skip
    ax.axhline(0, color="gray", ls=":")
    ax.set(xlabel="width", ylabel="final loss gap (nats)",
           title="Spectron − better dense variant (below 0: Spectron lower)")  # fmt: skip
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(out_dir / "gap_vs_size.png", dpi=110)
    plt.close(fig)
