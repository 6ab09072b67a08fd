"""The stability sweep's report: ``results.json``, ``results.md`` and three plots, from the run records alone
(so it can be regenerated from ``runs/*.json`` without training anything)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from ..presets import count_parameters
from .sweep import VARIANTS, SweepPlan, best_learning_rate

ADAMW_FAMILY = ("adamw",)  # optimizers whose lr is an AdamW step; the others' lr is a spectral-norm bound


def summarize(plan: SweepPlan, done: dict[str, dict], data_info: dict) -> dict:
    """The ``results.json`` payload: settings, model, one entry per variant, and the equal-FLOPs comparison."""
    s = plan.settings
    factorized, dense = s.model_config(dense=False), s.model_config(dense=True)
    counts = {"factorized": count_parameters(factorized), "dense": count_parameters(dense)}
    variants = {}
    for variant in plan.variants:
        grid = [done[job.id] for job in plan.grid_jobs() if job.variant == variant and job.id in done]
        best = best_learning_rate(grid) if len(grid) == len(s.lr_grids[variant]) else None
        seeds = sorted(
            (r for r in done.values() if r["variant"] == variant and r["lr"] == best and r["steps"] == s.max_steps),
            key=lambda r: r["seed"],
        )
        flops_runs = [r for r in done.values() if r["variant"] == variant and r["role"] == "flops" and r["lr"] == best]
        losses = [r["final_loss"] for r in seeds]
        lrs = list(s.lr_grids[variant])
        variants[variant] = {
            "label": VARIANTS[variant].label,
            "lr_grid": lrs,
            "grid_complete": len(grid) == len(lrs),
            "best_lr": best,
            "best_lr_at_grid_edge": best is not None and best in (min(lrs), max(lrs)),
            "grid": [_brief(r) for r in sorted(grid, key=lambda r: r["lr"])],
            "diverged": sum(r["diverged"] for r in grid),
            "spikes_grid": sum(r["spikes"] for r in grid),
            "best_seeds": [_brief(r) for r in seeds],
            "final_loss_mean": sum(losses) / len(losses) if losses else None,
            "final_loss_spread": (max(losses) - min(losses)) / 2 if losses else None,
            "spikes_best": [r["spikes"] for r in seeds],
            "max_update_norm_best": max((r["max_update_norm"] for r in seeds), default=None),
            "max_update_norm_top_lr": next((r["max_update_norm"] for r in grid if r["lr"] == max(lrs)), None),
            "top_stable_lr": max((r["lr"] for r in grid if not r["diverged"]), default=None),
            "equal_flops": [_brief(r) for r in flops_runs],
        }
    equal_flops = []
    dense_best = variants.get("dense-adamw", {}).get("best_seeds", [])
    if dense_best:
        equal_flops.append({"variant": "dense-adamw", **_brief(dense_best[0])})
    for variant, entry in variants.items():
        for run in entry["equal_flops"]:
            equal_flops.append({"variant": variant, **run})
    return {
        "settings": dataclasses.asdict(s),
        "fingerprint": s.fingerprint(),
        "model": {
            "preset": s.preset,
            "overrides": s.model_overrides,
            "parameters": {k: c.total for k, c in counts.items()},
            "embedding_parameters": counts["factorized"].embeddings,
            "projection_parameters": {
                "factorized": counts["factorized"].projections,
                "dense": counts["dense"].projections,
            },
            "training_flops_per_token": plan.flops_per_token,
            "rank": factorized.rank_for("q_proj"),
        },
        "data": {
            **data_info,
            "tokens_per_step": plan.tokens_per_step,
            "tokens_per_run": s.max_steps * plan.tokens_per_step,
        },
        "variants": variants,
        "equal_flops": equal_flops,
        "runs": sorted(done),
        "wall_time_s": round(sum(r["wall_time_s"] for r in done.values()), 1),
    }


def _brief(record: dict) -> dict:
    keys = (
        "id", "lr", "seed", "steps", "steps_done", "tokens", "final_loss", "initial_loss", "diverged", "stop_reason",
        "spikes", "max_update_norm", "wall_time_s", "tokens_per_s", "flops_per_token",
    )  # fmt: skip
    return {k: record[k] for k in keys}


def write_report(out_dir: Path, plan: SweepPlan, done: dict[str, dict], data_info: dict) -> dict:
    summary = summarize(plan, done, data_info)
    out_dir = Path(out_dir)
    _write_text(out_dir / "results.json", json.dumps(summary, indent=1) + "\n")
    _write_text(out_dir / "results.md", results_markdown(summary))
    plot_all(out_dir, plan, done, summary)
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ markdown
def _loss(x: float | None) -> str:
    return "—" if x is None else ("non-finite" if not math.isfinite(x) else f"{x:.3f}")


def results_markdown(summary: dict) -> str:
    s, model, data = summary["settings"], summary["model"], summary["data"]
    params = model["parameters"]
    lines = [
        "# Stability sweep: results",
        "",
        "Generated by `scripts/stability_sweep.py` (see `docs/stability.md`); every number below is in `results.json`"
        " and every run's curves are in `runs/`.",
        "",
        f"- Model: preset `{model['preset']}` with {model['overrides']}, rank {model['rank']}: "
        f"{params['factorized'] / 1e6:.2f}M parameters factorized, {params['dense'] / 1e6:.2f}M dense "
        f"({model['embedding_parameters'] / 1e6:.2f}M of them embeddings + LM head).",
        f"- Training FLOPs per token: factorized {model['training_flops_per_token']['factorized'] / 1e6:.1f}M, "
        f"dense {model['training_flops_per_token']['dense'] / 1e6:.1f}M.",
        f"- Budget: {s['max_steps']} steps × {s['batch_size']} × {s['block_size']} tokens = "
        f"{data['tokens_per_run']:,} tokens per run (of {data['train_tokens']:,} training tokens: no repetition), "
        f"{s['warmup_ratio']:.0%} linear warm-up, cosine decay, gradient clipping {s['max_grad_norm']}, no weight "
        f"decay. Spectron-family runs train embeddings, LM head and norms with AdamW at {s['adamw_lr']:g}.",
        f"- Final loss: validation cross-entropy (nats/token) on a fixed {data['validation_tokens']:,}-token subset "
        f"(unigram baseline {data['unigram_loss']:.3f}). Mean ± half-range over {s['seeds']} seeds at the best lr.",
        "- Diverged: a non-finite loss, a final loss above the initial (step-1) loss, or a training loss above the "
        f"initial loss for {s['divergence_patience']} consecutive steps (the run is stopped there).",
        f"- Loss spike: `LossSpikeDetector(window={s['spike_window']}, threshold={s['spike_threshold']}, "
        f"min_increase={s['spike_min_increase']}, warmup={s['spike_warmup']})`: a step loss more than "
        f"{s['spike_threshold']:g} standard deviations and {s['spike_min_increase']:.0%} above the mean of the "
        f"previous {s['spike_window']} steps.",
        f"- max ‖ΔW‖₂: the largest spectral norm of one step's update over all projections, measured every "
        f"{s['diagnostics_every']} steps (`diag/update_norm_max`).",
        "",
        "## Per variant",
        "",
        "| variant | lr grid | best lr | final loss (best lr) | diverged / grid | spikes at best lr (per seed) "
        "| spikes over grid | max ‖ΔW‖₂ at best lr | max ‖ΔW‖₂ at the largest lr that did not diverge | "
        "max ‖ΔW‖₂ at top lr |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for v in summary["variants"].values():
        grid = ", ".join(f"{lr:g}" for lr in v["lr_grid"])
        if v["final_loss_mean"] is None:
            loss = "—"
        else:
            loss = f"{v['final_loss_mean']:.3f} ± {v['final_loss_spread']:.3f} (n={len(v['best_seeds'])})"
        best = "—" if v["best_lr"] is None else f"{v['best_lr']:g}" + (" (edge)" if v["best_lr_at_grid_edge"] else "")
        lines.append(
            f"| {v['label']} | {grid} | {best} | {loss} | {v['diverged']} / {len(v['grid'])} | "
            f"{', '.join(map(str, v['spikes_best'])) or '—'} | {v['spikes_grid']} | "
            f"{_num(v['max_update_norm_best'])} | {_stable(v)} | {_num(v['max_update_norm_top_lr'])} |"
        )
        if not v["grid_complete"]:
            notes.append(f"- {v['label']}: grid incomplete ({len(v['grid'])} of {len(v['lr_grid'])} runs).")
        if v["best_lr_at_grid_edge"]:
            notes.append(f"- {v['label']}: the best lr is at the edge of the grid; the optimum may lie beyond it.")
    lines += ["", *notes, *([""] if notes else []), "## Final validation loss per learning rate", ""]
    width = max(len(v["lr_grid"]) for v in summary["variants"].values())
    lines += ["| variant | " + " | ".join(f"lr #{i + 1}" for i in range(width)) + " |", "| --- |" + " ---: |" * width]
    for v in summary["variants"].values():
        cells = []
        for run in v["grid"]:
            mark = " ✗" if run["diverged"] else ""
            cells.append(f"{run['lr']:g}: {_loss(run['final_loss'])}{mark}")
        cells += [""] * (width - len(cells))
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    lines += ["", "✗ = diverged.", ""]
    if summary["equal_flops"]:
        lines += [
            "## Equal training FLOPs (dense vs factorized)",
            "",
            "Each at its best lr; the factorized runs see more tokens, scaled by the ratio of training FLOPs per token.",
            "",
            "| variant | lr | tokens | training FLOPs | final loss | diverged | tokens/s (1 thread, shared CPU) | wall |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for run in summary["equal_flops"]:
            flops = run["tokens"] * run["flops_per_token"]
            lines.append(
                f"| {summary['variants'][run['variant']]['label']} | {run['lr']:g} | {run['tokens']:,} | {flops:.2e} | "
                f"{_loss(run['final_loss'])} | {'yes' if run['diverged'] else 'no'} | {run['tokens_per_s']:,.0f} | "
                f"{run['wall_time_s']:.0f} s |"
            )
        lines.append("")
    lines += [
        f"Total training time over all {len(summary['runs'])} runs: {summary['wall_time_s'] / 60:.0f} worker-minutes.",
        "",
        "Plots: `loss_curves.png` (best lr per variant), `loss_vs_lr.png` (diverged runs marked ✗), "
        "`update_norm.png` (‖ΔW‖₂ over training).",
        "",
    ]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _stable(variant: dict) -> str:
    lr = variant["top_stable_lr"]
    if lr is None:
        return "—"
    return f"{_num(next(r['max_update_norm'] for r in variant['grid'] if r['lr'] == lr))} (lr {lr:g})"


# ------------------------------------------------------------------------------------------------ plots
def _smooth(values: list[float], width: int) -> list[float]:
    out, window = [], []
    for value in values:
        window.append(value)
        if len(window) > width:
            window.pop(0)
        out.append(sum(window) / len(window))
    return out


def plot_all(out_dir: Path, plan: SweepPlan, done: dict[str, dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(VARIANTS)}
    unigram = summary["data"]["unigram_loss"]
    smooth = max(1, plan.settings.max_steps // 15)

    # Loss curves at each variant's best lr (seed of the grid), and the equal-FLOPs pair against FLOPs.
    fig, (ax, ax_flops) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for name, v in variants.items():
        if v["best_seeds"]:
            losses = done[v["best_seeds"][0]["id"]]["losses"]
            ax.plot(
                range(1, len(losses) + 1),
                _smooth(losses, smooth),
                color=colors[name],
                label=f"{v['label']}, lr {v['best_lr']:g}",
            )
    ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
    ax.set(
        xlabel="step",
        ylabel="training loss (nats/token)",
        title=f"best lr per variant (moving average over {smooth} steps)",
    )
    ax.set_ylim(top=min(ax.get_ylim()[1], unigram + 2))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for run in summary["equal_flops"]:
        record = done[run["id"]]
        per_step = plan.tokens_per_step * record["flops_per_token"]
        losses = record["losses"]
        ax_flops.plot(
            [per_step * (i + 1) for i in range(len(losses))],
            _smooth(losses, smooth),
            color=colors[run["variant"]],
            label=f"{variants[run['variant']]['label']} ({record['tokens']:,} tokens)",
        )
    ax_flops.axhline(unigram, color="gray", ls=":")
    ax_flops.set(xlabel="training FLOPs", ylabel="training loss", title="equal training FLOPs")
    ax_flops.set_ylim(top=min(ax_flops.get_ylim()[1], unigram + 2))
    if summary["equal_flops"]:
        ax_flops.legend(fontsize=7)
    ax_flops.grid(alpha=0.3)
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    # Final loss vs lr, in two panels since the two families' lrs have different units.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    cap = max((r["initial_loss"] for r in done.values() if math.isfinite(r["initial_loss"])), default=unigram + 3)
    for name, v in variants.items():
        ax = axes[0] if VARIANTS[name].optimizer in ADAMW_FAMILY else axes[1]
        lrs = [r["lr"] for r in v["grid"]]
        shown = [min(r["final_loss"], cap) if math.isfinite(r["final_loss"]) else cap for r in v["grid"]]
        ax.plot(lrs, shown, "-o", color=colors[name], label=v["label"], ms=4)
        bad = [(lr, y) for lr, y, r in zip(lrs, shown, v["grid"]) if r["diverged"]]
        if bad:
            ax.plot(*zip(*bad), "x", color=colors[name], ms=12, mew=2.5)
        for run in v["best_seeds"][1:]:
            ax.plot([run["lr"]], [min(run["final_loss"], cap)], "s", color=colors[name], ms=4, alpha=0.6)
    for ax, unit in zip(axes, ("AdamW lr (per-entry step)", "lr = spectral-norm bound of ‖ΔW‖₂ per step")):
        ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
        ax.set(xscale="log", xlabel=unit, ylabel="final validation loss (capped at the initial loss)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_title("AdamW: dense vs naive low-rank (✗ = diverged, ■ = other seeds)")
    axes[1].set_title("Spectron family (✗ = diverged, ■ = other seeds)")
    fig.savefig(out_dir / "loss_vs_lr.png", dpi=110)
    plt.close(fig)

    # ‖ΔW‖₂ over training at the best lr and at the top of each grid.
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), constrained_layout=True, sharey=True)
    for name, v in variants.items():
        best = v["best_seeds"][0] if v["best_seeds"] else None
        stable = next((r for r in v["grid"] if r["lr"] == v["top_stable_lr"]), None)
        top = next((r for r in v["grid"] if r["lr"] == max(v["lr_grid"])), None)
        for ax, run in zip(axes, (best, stable, top)):
            if run is None:
                continue
            points = [(s, u) for s, u in done[run["id"]]["update_norms"] if math.isfinite(u) and u > 0]
            if points:
                ax.plot(*zip(*points), color=colors[name], label=f"{v['label']}, lr {run['lr']:g}", lw=1)
    axes[0].set_title("max ‖ΔW‖₂ per step, best lr")
    axes[1].set_title("max ‖ΔW‖₂ per step, largest lr that did not diverge")
    axes[2].set_title("max ‖ΔW‖₂ per step, largest lr of each grid (diverged runs stop early)")
    for ax in axes:
        ax.set(yscale="log", xlabel="step", ylabel="max over projections of ‖ΔW‖₂")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.savefig(out_dir / "update_norm.png", dpi=110)
    plt.close(fig)
