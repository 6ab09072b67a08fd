"""Fits of the scaling study: loss vs non-embedding parameters N, and where loss is lowest at a fixed budget.

Pure numpy on (N, loss) points, one point per run (seeds are separate points, so their spread enters the
residuals). Every fit returns a dict for ``summary.json``: the parameters with standard errors from the fit's
covariance (residual variance × (JᵀJ)⁻¹), the points and degrees of freedom behind them, or ``reason`` saying
why there is no number.
"""

from __future__ import annotations

import math

import numpy as np

# The three-parameter law needs this many distinct sizes: with 3 it passes through every size's mean and has
# nothing left to be judged by.
SATURATING_MIN_SIZES = 4
_ALPHA_GRID = np.geomspace(0.01, 4.0, 2000)  # exponents the saturating fit searches


def _stderr(jacobian: np.ndarray, residuals: np.ndarray) -> list[float] | None:
    """Standard errors of least-squares parameters (None without a degree of freedom or with a singular fit)."""
    dof = len(residuals) - jacobian.shape[1]
    if dof <= 0:
        return None
    try:
        covariance = np.linalg.inv(jacobian.T @ jacobian) * float(residuals @ residuals) / dof
    except np.linalg.LinAlgError:
        return None
    return [float(math.sqrt(max(v, 0.0))) for v in np.diag(covariance)]


def loglog_fit(n: list[float], loss: list[float]) -> dict:
    """log L = log A − α·log N by least squares: a pure power law, i.e. the local slope of loss vs N over the sizes
    trained (it has no irreducible term, so α is not the asymptotic exponent)."""
    distinct = len(set(n))
    if distinct < 2:
        return {"method": None, "reason": f"{distinct} size(s) with a finite loss; a fit needs 2 or more."}
    x, y = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
    jacobian = np.stack([np.ones_like(x), x], axis=1)
    (log_a, slope), *_ = np.linalg.lstsq(jacobian, y, rcond=None)
    residuals = y - jacobian @ np.array([log_a, slope])
    errors = _stderr(jacobian, residuals)
    return {
        "method": "loglog",
        "form": "L = A * N^(-alpha)",
        "alpha": float(-slope),
        "alpha_stderr": None if errors is None else errors[1],
        "A": float(math.exp(log_a)),
        "log_A_stderr": None if errors is None else errors[0],
        **_fit_facts(n, len(residuals) - 2, float(np.sqrt(np.mean(residuals**2)))),
    }


def saturating_fit(n: list[float], loss: list[float]) -> dict:
    """L = E + A·N^(−α) by least squares (E ≥ 0, A > 0): for each α on a grid, E and A are a linear fit to
    N^(−α); the best α is refined on a finer grid around it. Needs `SATURATING_MIN_SIZES` distinct sizes."""
    distinct = len(set(n))
    if distinct < SATURATING_MIN_SIZES:
        return {
            "method": None,
            "reason": f"{distinct} distinct sizes, too few for E + A*N^(-alpha) (3 parameters: needs "
            f"{SATURATING_MIN_SIZES} to leave one to judge it by).",
        }
    n_arr, y = np.asarray(n, float), np.asarray(loss, float)
    scale = n_arr.min()  # N / N_min keeps N^(-alpha) near 1 for every alpha

    def solve(alpha):
        x = (n_arr / scale) ** -alpha
        design = np.stack([np.ones_like(x), x], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if e < 0 or a <= 0:
            return math.inf, e, a
        r = y - design @ np.array([e, a])
        return float(r @ r), e, a

    best = min(_ALPHA_GRID, key=lambda alpha: solve(alpha)[0])
    fine = np.geomspace(best / 1.01, best * 1.01, 401)
    alpha = float(min(fine, key=lambda a: solve(a)[0]))
    sse, e, a = solve(alpha)
    if not math.isfinite(sse):
        return {"method": None, "reason": "no E >= 0, A > 0 fits: the loss does not fall with N."}
    if alpha <= _ALPHA_GRID[0] * 1.01 or alpha >= _ALPHA_GRID[-1] / 1.01:
        return {"method": None, "reason": f"the exponent runs to the edge of its search range (alpha = {alpha:.3g})."}
    x = (n_arr / scale) ** -alpha
    residuals = y - (e + a * x)
    jacobian = np.stack([np.ones_like(x), x, -a * x * np.log(n_arr / scale)], axis=1)  # ∂L/∂(E, A', alpha)
    errors = _stderr(jacobian, residuals)
    a_true = a * scale**alpha  # A of L = E + A * N^(-alpha) in unscaled N
    return {
        "method": "saturating",
        "form": "L = E + A * N^(-alpha)",
        "E": float(e),
        "E_stderr": None if errors is None else errors[0],
        "A": float(a_true),
        "alpha": alpha,
        "alpha_stderr": None if errors is None else errors[2],
        **_fit_facts(n, len(residuals) - 3, float(np.sqrt(np.mean(residuals**2)))),
    }


def loss_vs_params_fit(n: list[float], loss: list[float]) -> dict:
    """The saturating law where the sizes allow it, else the log-log line; ``fallback`` says why."""
    finite = [(x, y) for x, y in zip(n, loss) if y is not None and math.isfinite(y)]
    n, loss = [x for x, _ in finite], [y for _, y in finite]
    saturating = saturating_fit(n, loss)
    if saturating["method"] is not None:
        return saturating
    fit = loglog_fit(n, loss)
    return {**fit, "fallback": f"not E + A*N^(-alpha): {saturating['reason']}"}


def _fit_facts(n: list[float], dof: int, rms: float) -> dict:
    return {"points": len(n), "distinct_sizes": len(set(n)), "dof": dof, "rms_residual": rms}


# ------------------------------------------------------------------------------------------------ optimal size
def optimal_size(n: list[float], loss: list[float]) -> dict:
    """Where loss is lowest at one budget: the best size trained, and, with 3 or more sizes, the minimum of a
    parabola in log N through the sizes' mean losses, kept only if it is a minimum inside the sizes trained."""
    means = _means(n, loss)
    if not means:
        return {"best_size_n": None, "n_opt": None, "reason": "no finite loss at this budget."}
    sizes = sorted(means)
    best = min(sizes, key=means.get)
    out = {"best_size_n": best, "n_opt": None}
    if len(sizes) < 3:
        return {**out, "reason": f"{len(sizes)} sizes; a minimum between sizes needs 3."}
    x = np.log(np.asarray(sizes, float))
    curvature, slope, _ = np.polyfit(x, [means[s] for s in sizes], 2)
    if curvature <= 0:
        return {**out, "reason": "loss vs log N is not convex over these sizes: no minimum between them."}
    vertex = -slope / (2 * curvature)
    if not x[0] <= vertex <= x[-1]:
        side = "below the smallest" if vertex < x[0] else "above the largest"
        return {**out, "reason": f"the fitted minimum lies {side} size trained; train sizes beyond it to locate it."}
    return {**out, "n_opt": float(math.exp(vertex)), "method": "parabola in log N through the sizes' mean losses"}


def optimal_size_exponent(budgets: list[float], n_opts: list[float | None]) -> dict:
    """a in N_opt ∝ C^a: the log-log slope of the located optima over the budgets (standard error from 3 on)."""
    points = [(c, n) for c, n in zip(budgets, n_opts) if n is not None]
    missing = [f"{c:.3g}" for c, n in zip(budgets, n_opts) if n is None]
    if len(points) < 2:
        why = f"N_opt is located at {len(points)} budget(s)" + (f" (not at {', '.join(missing)})" if missing else "")
        return {"a": None, "reason": f"{why}; the exponent needs 2 or more."}
    fit = loglog_fit([c for c, _ in points], [n for _, n in points])  # log N_opt = log k − (−a)·log C
    return {
        "a": -fit["alpha"],
        "a_stderr": fit["alpha_stderr"],
        "budgets": [c for c, _ in points],
        **({"not_located_at": missing} if missing else {}),
    }


def _means(n: list[float], loss: list[float]) -> dict[float, float]:
    by_size: dict[float, list[float]] = {}
    for x, y in zip(n, loss):
        if y is not None and math.isfinite(y):
            by_size.setdefault(x, []).append(y)
    return {x: float(np.mean(ys)) for x, ys in by_size.items()}
