"""The stability study's report: ``summary.json``, ``results.md`` and the plots, from the run records alone (so
``--report_only`` regenerates them without training anything)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from ..configuration_lowrank import count_parameters
from ..files import write_text_atomic
from .plan import FLOPS_VARIANTS, RANK_VARIANT, STRESS_VARIANTS, VARIANTS, StudyPlan

ADAMW_FAMILY = ("adamw",)  # optimizers whose lr is an AdamW step; the others' lr is a spectral-norm bound
WIDTH_TOLERANCE = 0.1  # nats: the lr range whose final loss is within this of the best


# ------------------------------------------------------------------------------------------------ measures
def lr_width_decades(finals: dict[float, tuple[float, bool]], grid: list[float], tolerance: float) -> float | None:
    """Width (decades) of the lr range whose final loss is within ``tolerance`` of the best.

    Walks the grid outward from the best lr; between two adjacent grid points that both trained to the end the
    loss is interpolated linearly in log(lr); the range stops at a diverged neighbour and is never extrapolated
    past a grid point that was not trained to the end (pruned at the rung, its final loss is unknown).
    """
    alive = {lr: loss for lr, (loss, diverged) in finals.items() if not diverged and math.isfinite(loss)}
    if not alive:
        return None
    best = min(alive, key=alive.get)
    threshold = alive[best] + tolerance
    grid = sorted(grid)
    edges = []
    for direction in (-1, 1):
        i, edge = grid.index(best), math.log10(best)
        while 0 <= i + direction < len(grid):
            nxt = grid[i + direction]
            if nxt not in alive:  # diverged, or pruned before the end: the range stops at the last measured lr
                break
            if alive[nxt] > threshold:  # crossing between two measured points
                here, there = alive[grid[i]], alive[nxt]
                frac = (threshold - here) / (there - here)
                edge = math.log10(grid[i]) + frac * (math.log10(nxt) - math.log10(grid[i]))
                break
            i, edge = i + direction, math.log10(nxt)
        edges.append(edge)
    return round(edges[1] - edges[0], 3)


def _growth(record: dict, key: str) -> float | None:
    """Last over first measured value of a diagnostics curve (e.g. the largest σ(up) over training)."""
    values = [v for v in record["diagnostics"].get(key, []) if v is not None and math.isfinite(v)]
    return values[-1] / values[0] if len(values) >= 2 and values[0] > 0 else None


def _factor_growth(record: dict) -> float | None:
    growth = [g for g in (_growth(record, "sigma_up_max"), _growth(record, "sigma_down_max")) if g is not None]
    return max(growth) if growth else None


def _finite_max(values) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _brief(record: dict) -> dict:
    keys = (
        "id", "lr", "seed", "steps", "clip", "rank_ratio", "rank", "steps_done", "tokens", "initial_loss", "final_loss",
        "evals", "diverged", "stop_reason", "spikes", "skipped_steps", "max_update_norm", "wall_time_s",
        "tokens_per_s", "flops_per_token", "parameters",
    )  # fmt: skip
    out = {k: record.get(k) for k in keys}
    out["training_flops"] = record["tokens"] * record["flops_per_token"]
    out["factor_norm_growth"] = _factor_growth(record)
    out["weight_norm_growth"] = _growth(record, "weight_norm_max")
    out["max_weight_norm"] = _finite_max(record["diagnostics"].get("weight_norm_max", []))
    return out


# ------------------------------------------------------------------------------------------------ summary
def summarize(plan: StudyPlan, done: dict[str, dict], data_info: dict) -> dict:
    """The ``summary.json`` payload (the fields the issue names, plus the details behind them)."""
    s = plan.settings
    factorized, dense = s.model_config(dense=False), s.model_config(dense=True)
    counts = {"factorized": count_parameters(factorized), "dense": count_parameters(dense)}
    variants = {}
    for name in plan.variants:
        lrs = plan.grid_lrs(name, done)
        grid = {lr: done.get(plan.grid_job(name, lr).id) for lr in lrs}
        final = plan.grid_final(name, done)
        best = plan.best_lr(name, done) if final else None
        top = plan.top_stable_lr(name, done) if final else None
        at_best = _seed_runs(done, name, best, s.steps)
        at_top = _seed_runs(done, name, top, s.steps)
        finals = plan.grid_finals(name, done)
        variants[name] = {
            "label": VARIANTS[name].label,
            "optimizer": VARIANTS[name].optimizer,
            "learning_rates": lrs,
            "initial_grid": sorted(s.lr_grids[name]),
            "grid_final": final,
            "best_lr": best,
            "final_loss": [r["final_loss"] for r in at_best],
            "final_loss_mean": _mean([r["final_loss"] for r in at_best]),
            "diverged": sum(1 for r in grid.values() if r is not None and r["diverged"]),
            # Runs that did not diverge but never got below the unigram baseline: they stalled at the token
            # frequencies (judged at their last evaluation, the rung for runs pruned there).
            "stalled": sorted(
                r["lr"]
                for r in grid.values()
                if r is not None and not r["diverged"] and r["final_loss"] >= data_info["unigram_loss"]
            ),
            "lr_width_decades": lr_width_decades(finals, lrs, WIDTH_TOLERANCE) if final else None,
            "largest_stable_lr": top,
            "final_loss_at_largest_stable_lr": [r["final_loss"] for r in at_top],
            "spikes": sum(r["spikes"] for r in grid.values() if r is not None)
            + sum(r["spikes"] for r in at_best + at_top if r["seed"] != s.seed),
            "spikes_at_best_lr": [r["spikes"] for r in at_best],
            "max_update_norm_at_best_lr": _finite_max(r["max_update_norm"] for r in at_best),
            "max_update_norm_at_largest_stable_lr": _finite_max(r["max_update_norm"] for r in at_top),
            "factor_norm_growth_at_best_lr": [_factor_growth(r) for r in at_best],
            "weight_norm_growth_at_best_lr": [_growth(r, "weight_norm_max") for r in at_best],
            "grid": [
                {
                    "lr": lr,
                    "trained_to_end": r is not None and (r["diverged"] or r["steps_done"] >= s.steps),
                    **_brief(r),
                }
                for lr, r in grid.items()
                if r is not None
            ],
            "seeds_at_best_lr": [_brief(r) for r in at_best],
            "seeds_at_largest_stable_lr": [_brief(r) for r in at_top],
        }

    rank_runs = [r for r in done.values() if r["rank_ratio"] is not None and r["clip"]]
    rank_ablation = {
        f"{ratio:g}": [r["final_loss"] for r in rank_runs if r["rank_ratio"] == ratio] for ratio in s.rank_ratios
    }
    spectron = variants.get(RANK_VARIANT, {})
    rank_ablation[f"{factorized.rank_ratio:g}"] = spectron.get("final_loss", [])
    rank_ablation = dict(sorted(rank_ablation.items(), key=lambda kv: float(kv[0])))
    rank_models = {}
    for ratio in rank_ablation:
        config = s.model_config(dense=False, rank_ratio=float(ratio))
        rank_models[ratio] = {"rank": config.rank_for("q_proj"), "parameters": count_parameters(config).total}

    equal_flops = {}
    for name, entry in variants.items():  # a dense variant's steps-long runs are the FLOP budget itself
        if VARIANTS[name].dense and entry["seeds_at_best_lr"]:
            equal_flops[name] = _flops_entry(entry["seeds_at_best_lr"])
    for name in FLOPS_VARIANTS:
        best = variants.get(name, {}).get("best_lr")
        runs = [
            _brief(r)
            for r in done.values()
            if r["variant"] == name and r["lr"] == best and r["steps"] == plan.flops_steps(name) and r["clip"]
            and r["rank_ratio"] is None and r["steps_done"] >= r["steps"]
        ]  # fmt: skip
        if runs:
            equal_flops[name] = _flops_entry(sorted(runs, key=lambda r: r["seed"]))

    stress = []
    for name in STRESS_VARIANTS:
        for r in sorted((r for r in done.values() if r["variant"] == name and not r["clip"]), key=lambda r: r["lr"]):
            clipped = done.get(plan.grid_job(name, r["lr"]).id)
            stress.append(
                {"variant": name, **_brief(r), "clipped_twin": _brief(clipped) if clipped is not None else None}
            )

    segments = [seg for r in done.values() for seg in r["segments"] if "finished_at" in seg]
    return {
        "unigram_loss": data_info["unigram_loss"],
        "steps": s.steps,
        "tokens_per_run": s.steps * s.tokens_per_step,
        "tokens_per_step": s.tokens_per_step,
        "variants": variants,
        "rank_ablation": rank_ablation,
        "rank_ablation_dense_reference": variants.get("dense_adamw", {}).get("final_loss", []),
        "rank_ablation_models": rank_models,  # rank of the square projections and total parameters per ratio
        "equal_flops": equal_flops,
        "stress": stress,
        "settings": dataclasses.asdict(s),
        "fingerprint": s.fingerprint(),
        "complete": plan.finished(done),
        "model": {
            "preset": s.preset,
            "overrides": s.model_overrides,
            "parameters": {k: c.total for k, c in counts.items()},
            "embedding_parameters": counts["factorized"].embeddings,
            "projection_parameters": {k: c.projections for k, c in counts.items()},
            "rank": factorized.rank_for("q_proj"),
            "training_flops_per_token": {"factorized": s.flops_per_token(False), "dense": s.flops_per_token(True)},
        },
        "data": data_info,
        "runs": len(done),
        "segments": sum(len(r["segments"]) for r in done.values()),
        "worker_time_s": round(sum(seg["wall_s"] for r in done.values() for seg in r["segments"]), 1),
        "wall_time_s": round(
            _busy_time([(seg["finished_at"] - seg["wall_s"], seg["finished_at"]) for seg in segments]), 1
        )
        if segments
        else None,
    }


def _seed_runs(done: dict, variant: str, lr: float | None, steps: int) -> list[dict]:
    if lr is None:
        return []
    runs = [
        r for r in done.values()
        if r["variant"] == variant and r["lr"] == lr and r["steps"] == steps and r["clip"] and r["rank_ratio"] is None
        and (r["diverged"] or r["steps_done"] >= steps)
    ]  # fmt: skip
    return sorted(runs, key=lambda r: r["seed"])


def _flops_entry(runs: list[dict]) -> dict:
    return {
        "training_flops": runs[0]["training_flops"],
        "final_loss": [r["final_loss"] for r in runs],
        "lr": runs[0]["lr"],
        "steps": runs[0]["steps"],
        "tokens": runs[0]["tokens"],
        "parameters": runs[0]["parameters"],
    }


def write_report(out_dir: Path, plan: StudyPlan, done: dict[str, dict], data_info: dict) -> dict:
    summary = summarize(plan, done, data_info)
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", results_markdown(summary))
    plot_all(out_dir, plan, done, summary)
    return summary


# ------------------------------------------------------------------------------------------------ markdown
def _loss(x: float | None) -> str:
    return "—" if x is None else ("non-finite" if not math.isfinite(x) else f"{x:.3f}")


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _seeds(losses: list[float]) -> str:
    if not losses:
        return "—"
    if len(losses) == 1:
        return _loss(losses[0])
    return f"{statistics.fmean(losses):.3f} ± {(max(losses) - min(losses)) / 2:.3f}"


def results_markdown(summary: dict) -> str:
    s, model, data = summary["settings"], summary["model"], summary["data"]
    params = model["parameters"]
    lines = [
        "# Stability study: results",
        "",
        "Generated by `scripts/stability_sweep.py` from `runs/*.json` (see `docs/stability.md`); every number is in "
        "`summary.json`." + ("" if summary["complete"] else " **The study is not complete yet: partial results.**"),
        "",
        f"- Model: `{s['preset']}` preset with {model['overrides']}; factorized {params['factorized'] / 1e6:.2f}M "
        f"parameters (rank {model['rank']}; {model['projection_parameters']['factorized'] / 1e6:.2f}M in projections, "
        f"{model['embedding_parameters'] / 1e6:.2f}M in embeddings), dense {params['dense'] / 1e6:.2f}M "
        f"({model['projection_parameters']['dense'] / 1e6:.2f}M in projections).",
        f"- Data: the built-in corpus (Python standard library source), byte-level BPE vocabulary "
        f"{data['tokenizer_size']}, {data['train_tokens']:,} training tokens; validation on a fixed "
        f"{data['validation_tokens']:,}-token subset. Unigram baseline **{summary['unigram_loss']:.3f}** nats/token.",
        f"- Budget per run: {summary['steps']} steps × {summary['tokens_per_step']:,} tokens = "
        f"{summary['tokens_per_run']:,} tokens; {s['warmup_ratio']:.0%} linear warm-up, cosine decay to 0; gradient "
        f"clipping at {s['max_grad_norm']} (except the stress runs); AdamW groups of the Spectron family at "
        f"{s['adamw_lr']:g}; every AdamW group with betas {tuple(s['adamw_betas'])}. Successive halving: every grid run to step {s['rung_steps']}, then the "
        f"{s['promote_top']} best, those within {s['promote_margin']} nats of the best and the largest surviving lr "
        "continue to the end from their checkpoints.",
        f"- Divergence: a NaN/inf loss or gradient, the loss above the first step's loss for "
        f"{s['divergence_patience']} steps (`--divergence_patience`), or a final validation loss above the first "
        "training loss. Spikes: the package's `LossSpikeDetector` at its defaults.",
        f"- Compute: {summary['runs']} runs, {summary['segments']} segments, {_clock(summary['worker_time_s'])} of "
        f"worker time, {_clock(summary['wall_time_s'])} wall (time with a segment training) with {s['threads_per_worker']} thread per worker.",
        "",
        "## Per variant",
        "",
        "| variant | best lr | final loss (seeds) | below unigram | lr width (decades, ±0.1 nats) | diverged / grid "
        "| stalled at unigram | spikes | max ‖ΔW‖₂ at best lr | factor-norm growth | largest stable lr (final loss) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for v in summary["variants"].values():
        mean = v["final_loss_mean"]
        growth = [g for g in v["factor_norm_growth_at_best_lr"] if g is not None] or [
            g for g in v["weight_norm_growth_at_best_lr"] if g is not None
        ]
        lines.append(
            f"| {v['label']} | {_num(v['best_lr'], 'g')} | {_seeds(v['final_loss'])} | "
            f"{_num(None if mean is None else summary['unigram_loss'] - mean, '.2f')} | {_num(v['lr_width_decades'], '.2f')} "
            f"| {v['diverged']} / {len(v['learning_rates'])} | {', '.join(f'{lr:g}' for lr in v['stalled']) or '—'} "
            f"| {v['spikes']} | {_num(v['max_update_norm_at_best_lr'])} "
            f"| {'—' if not growth else f'{max(growth):.2f}×'} | {_num(v['largest_stable_lr'], 'g')} "
            f"({_seeds(v['final_loss_at_largest_stable_lr'])}) |"
        )
    lines += [
        "",
        "Factor-norm growth: the largest σ(up) or σ(down) over the layers at the end of training over its value at the "
        "first measurement (dense: ‖W‖₂). Largest stable lr: the largest lr whose run trained to the end without "
        "diverging. Stalled: lrs whose runs did not diverge but ended (or were pruned) at or above the unigram "
        "baseline.",
        "",
        "## Grids",
        "",
        f"Validation loss at the rung (step {s['rung_steps']}) and at the end; `pruned` runs stopped at the rung.",
        "",
    ]
    for v in summary["variants"].values():
        lines += [f"**{v['label']}** (grid {', '.join(f'{lr:g}' for lr in v['learning_rates'])})", ""]
        lines += [
            "| lr | rung loss | final loss | max ‖ΔW‖₂ | spikes | status |",
            "| ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in v["grid"]:
            rung = r["evals"].get(str(s["rung_steps"]))
            status = (
                f"diverged at step {r['steps_done']}"
                if r["diverged"]
                else ("trained" if r["trained_to_end"] else ("pruned" if v["grid_final"] else "at the rung so far"))
            )
            final = _loss(r["final_loss"]) if r["trained_to_end"] else "—"
            lines.append(
                f"| {r['lr']:g} | {_loss(rung)} | {final} | {_num(r['max_update_norm'])} | {r['spikes']} | {status} |"
            )
        lines.append("")

    lines += [
        "## Rank ablation (Spectron at its best lr)",
        "",
        "| rank ratio | rank (hidden × hidden projections) | parameters | final loss (seeds) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    models = summary.get("rank_ablation_models", {})
    for ratio, losses in summary["rank_ablation"].items():
        model = models.get(ratio, {})
        rank, params = model.get("rank", "—"), model.get("parameters")
        lines.append(f"| {ratio} | {rank} | {f'{params / 1e6:.2f}M' if params else '—'} | {_seeds(losses)} |")
    dense_params = summary["model"]["parameters"].get("dense")
    lines.append(
        f"| dense (AdamW) | — | {f'{dense_params / 1e6:.2f}M' if dense_params else '—'} | "
        f"{_seeds(summary['rank_ablation_dense_reference'])} |"
    )
    lines += [
        "",
        "## Equal training FLOPs",
        "",
        "| variant | lr | steps | tokens | training FLOPs | final loss (seeds) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, e in summary["equal_flops"].items():
        lines.append(
            f"| {VARIANTS[name].label} | {e['lr']:g} | {e['steps']} | {e['tokens']:,} | {e['training_flops']:.3g} | "
            f"{_seeds(e['final_loss'])} |"
        )
    lines += [
        "",
        "## Stress: no gradient clipping",
        "",
        "| variant | lr | final loss | status | max ‖ΔW‖₂ | spikes | with clipping: final loss, max ‖ΔW‖₂ |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in summary["stress"]:
        twin = r["clipped_twin"]
        if twin is None:
            twin_text = "not trained"
        elif twin["steps_done"] < twin["steps"] and not twin["diverged"]:  # pruned at the rung: not a final loss
            twin_text = (
                f"{_loss(twin['final_loss'])} at step {twin['steps_done']} (pruned), {_num(twin['max_update_norm'])}"
            )
        else:
            twin_text = f"{_loss(twin['final_loss'])}, {_num(twin['max_update_norm'])}"
        status = f"diverged at step {r['steps_done']}" if r["diverged"] else "trained"
        lines.append(
            f"| {VARIANTS[r['variant']].label} | {r['lr']:g} | {_loss(r['final_loss'])} | {status} | "
            f"{_num(r['max_update_norm'])} | {r['spikes']} | {twin_text} |"
        )
    lines.append("")
    return "\n".join(lines)


def _busy_time(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one segment was training: the union of the (start, end) intervals, so a study
    run over several sessions days apart counts its sessions, not the days between them."""
    total, end = 0.0, float("-inf")
    for start, finish in sorted(intervals):
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------ plots
def running_mean(values: list[float], width: int) -> list[float]:
    """The mean of each value and the ``width - 1`` before it (a NaN spoils only the windows that hold it)."""
    out, window = [], []
    for value in values:
        window.append(value)
        if len(window) > width:
            window.pop(0)
        out.append(sum(window) / len(window))
    return out


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(**kwargs)


def plot_all(out_dir: Path, plan: StudyPlan, done: dict[str, dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(VARIANTS)}
    unigram = summary["unigram_loss"]
    smooth = max(1, plan.settings.steps // 50)
    rung = str(plan.settings.rung_steps)

    def curve(record):
        return record["curve"]["step"], running_mean(record["curve"]["loss"], smooth)

    # 1. Loss curves at each variant's best lr.
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for name, v in variants.items():
        for i, run in enumerate(v["seeds_at_best_lr"]):
            record = done[run["id"]]
            ax.plot(*curve(record), color=colors[name], lw=1, alpha=1 if i == 0 else 0.4,
                    label=f"{v['label']}, lr {v['best_lr']:g}" if i == 0 else None)  # fmt: skip
            evals = sorted((int(k), x) for k, x in record["evals"].items())
            ax.plot(*zip(*evals), "o", color=colors[name], ms=4, alpha=1 if i == 0 else 0.4)
    ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"best lr per variant: training loss ({smooth}-step mean), "
           "validation loss (dots); faint: other seeds")  # fmt: skip
    ax.set_ylim(top=unigram + 1)
    _legend(ax, fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    # 2. Final loss vs lr, one panel per lr unit.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    cap = unigram + 1
    for name, v in variants.items():
        ax = axes[0] if VARIANTS[name].optimizer in ADAMW_FAMILY else axes[1]
        full = [(r["lr"], r["final_loss"]) for r in v["grid"] if r["trained_to_end"] and not r["diverged"]]
        if full:
            ax.plot(*zip(*full), "-o", color=colors[name], label=v["label"], ms=5)
        pruned = [(r["lr"], r["evals"][rung]) for r in v["grid"] if not r["trained_to_end"] and rung in r["evals"]]
        if pruned:
            ax.plot(*zip(*pruned), "o", mfc="none", color=colors[name], ms=6)
        bad = [r["lr"] for r in v["grid"] if r["diverged"]]
        if bad:
            ax.plot(bad, [cap] * len(bad), "x", color=colors[name], ms=11, mew=2.5)
        for run in v["seeds_at_best_lr"][1:] + v["seeds_at_largest_stable_lr"][1:]:
            ax.plot([run["lr"]], [min(run["final_loss"], cap)], "s", color=colors[name], ms=4, alpha=0.6)
    for ax, unit in zip(axes, ("AdamW lr (per-entry step)", "lr = spectral-norm bound of ‖ΔW‖₂ per step")):
        ax.axhline(unigram, color="gray", ls=":", label="unigram baseline")
        ax.set(xscale="log", xlabel=unit, ylabel="validation loss at the end of training")
        ax.set_ylim(top=cap + 0.1)
        _legend(ax, fontsize=7)
        ax.grid(alpha=0.3)
    note = "● final, ○ rung loss of runs pruned at the rung, ✗ diverged (drawn at unigram+1), ■ other seeds"
    axes[0].set_title(f"AdamW: dense vs naive low-rank\n{note}", fontsize=9)
    axes[1].set_title(f"Spectron family\n{note}", fontsize=9)
    fig.savefig(out_dir / "loss_vs_lr.png", dpi=110)
    plt.close(fig)

    # 3. The mechanism: factor norms, ‖W‖₂ and ‖ΔW‖₂ over training, at the best and the largest stable lr.
    fig, axes = plt.subplots(2, 3, figsize=(18, 9), constrained_layout=True)
    for row, key in enumerate(("seeds_at_best_lr", "seeds_at_largest_stable_lr")):
        for name, v in variants.items():
            if not v[key]:
                continue
            record = done[v[key][0]["id"]]
            d, c = record["diagnostics"], colors[name]
            label = f"{v['label']}, lr {record['lr']:g}"
            if d.get("sigma_up_max") and d["sigma_up_max"][0] is not None:
                axes[row, 0].plot(d["step"], d["sigma_up_max"], color=c, label=f"{label}: up")
                axes[row, 0].plot(d["step"], d["sigma_down_max"], color=c, ls="--", label=f"{label}: down")
            axes[row, 1].plot(d["step"], d["weight_norm_max"], color=c, label=f"{label}: max")
            axes[row, 1].plot(d["step"], d["weight_norm_mean"], color=c, ls=":", label=f"{label}: mean")
            axes[row, 2].plot(d["step"], d["update_norm_max"], color=c, lw=1, label=f"{label}: max")
            axes[row, 2].plot(d["step"], d["update_norm_mean"], color=c, lw=1, ls=":", label=f"{label}: mean")
        which = "best lr" if row == 0 else "largest stable lr"
        axes[row, 0].set_title(f"{which}: max σ(up) solid, σ(down) dashed", fontsize=10)
        axes[row, 1].set_title(f"{which}: ‖W‖₂, max solid, mean dotted", fontsize=10)
        axes[row, 2].set_title(f"{which}: ‖ΔW‖₂ per step, max solid, mean dotted", fontsize=10)
        for ax in axes[row]:
            ax.set(yscale="log", xlabel="step")
            ax.grid(alpha=0.3, which="both")
            _legend(ax, fontsize=6)
    fig.savefig(out_dir / "norms.png", dpi=100)
    plt.close(fig)

    # 4. Stress: without gradient clipping, against the clipped twin.
    if summary["stress"]:
        fig, (ax_loss, ax_update) = plt.subplots(1, 2, figsize=(14, 4.8), constrained_layout=True)
        styles = ["-", "--"]
        for r in summary["stress"]:
            by_variant = [x for x in summary["stress"] if x["variant"] == r["variant"]]
            ls = styles[by_variant.index(r) % 2]
            for record, alpha, tag in (
                (done[r["id"]], 1.0, "no clip"),
                (done.get(r["clipped_twin"]["id"]) if r["clipped_twin"] else None, 0.35, "clip 1.0"),
            ):
                if record is None:
                    continue
                label = f"{VARIANTS[r['variant']].label}, lr {r['lr']:g}, {tag}"
                ax_loss.plot(*curve(record), color=colors[r["variant"]], ls=ls, alpha=alpha, lw=1, label=label)
                d = record["diagnostics"]
                ax_update.plot(d["step"], d["update_norm_max"], color=colors[r["variant"]], ls=ls, alpha=alpha, lw=1)
        ax_loss.axhline(unigram, color="gray", ls=":")
        ax_loss.set(
            xlabel="step", ylabel="training loss", title="stress runs: no gradient clipping (faint: clipped twin)"
        )
        ax_loss.set_ylim(top=unigram + 1)
        _legend(ax_loss, fontsize=7)
        ax_update.set(xlabel="step", yscale="log", title="max ‖ΔW‖₂ per step")
        for ax in (ax_loss, ax_update):
            ax.grid(alpha=0.3)
        fig.savefig(out_dir / "stress.png", dpi=110)
        plt.close(fig)

    # 5. Rank ablation, 6. equal training FLOPs.
    fig, (ax_rank, ax_flops) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    for ratio, losses in summary["rank_ablation"].items():
        ax_rank.plot([float(ratio)] * len(losses), losses, "o", color=colors[RANK_VARIANT])
    means = [(float(k), statistics.fmean(v)) for k, v in summary["rank_ablation"].items() if v]
    if means:
        ax_rank.plot(*zip(*means), "-", color=colors[RANK_VARIANT], label="Spectron (seeds as dots)")
    if summary["rank_ablation_dense_reference"]:
        ax_rank.axhline(statistics.fmean(summary["rank_ablation_dense_reference"]), color=colors["dense_adamw"],
                        ls="--", label="dense + AdamW")  # fmt: skip
    ax_rank.set(xlabel="rank ratio", ylabel="final validation loss", title="rank ablation (same steps and tokens)")
    _legend(ax_rank, fontsize=8)
    for name, e in summary["equal_flops"].items():
        record = next(
            r for r in done.values()
            if r["variant"] == name and r["lr"] == e["lr"] and r["steps"] == e["steps"] and r["clip"]
            and r["rank_ratio"] is None
        )  # fmt: skip
        per_step = plan.settings.tokens_per_step * record["flops_per_token"]
        steps, losses = curve(record)
        label = f"{VARIANTS[name].label}, {e['tokens']:,} tokens: {_seeds(e['final_loss'])}"
        ax_flops.plot([per_step * step for step in steps], losses, color=colors[name], label=label)
    ax_flops.axhline(unigram, color="gray", ls=":")
    ax_flops.set(
        xlabel="training FLOPs", ylabel="training loss", title="equal training FLOPs (final validation loss in legend)"
    )
    ax_flops.set_ylim(top=unigram + 1)
    _legend(ax_flops, fontsize=7)
    for ax in (ax_rank, ax_flops):
        ax.grid(alpha=0.3)
    fig.savefig(out_dir / "rank_and_flops.png", dpi=110)
    plt.close(fig)
