"""The loss / spectral-norm figure saved beside every trained model."""

from pathlib import Path


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_training_curves(log_history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Two panels from the Trainer's log history: train/validation loss, and σ(up), σ(down), ‖ΔW‖₂ per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
        steps, values = _series(log_history, key)
        if steps:
            ax_loss.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.set_title(title or "loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    for key, label in (
        ("diag/sigma_up_max", "max σ(up)"),
        ("diag/sigma_down_max", "max σ(down)"),
        ("diag/update_norm_max", "max ‖ΔW‖₂"),
    ):
        steps, values = _series(log_history, key)
        if steps:
            ax_norm.plot(steps, values, label=label)
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("step")
    ax_norm.set_title("spectral norms over factorized layers")
    if ax_norm.get_legend_handles_labels()[0]:
        ax_norm.legend()
    ax_norm.grid(alpha=0.3, which="both")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
