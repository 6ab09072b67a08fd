"""A refactor changes no number: the golden runs (tests/golden_run.py) reproduce the stored values on any x86-64 CPU
within a tolerance that a real change of behaviour exceeds."""

from golden_run import RTOL, differences, golden_runs, load


def test_golden_runs_reproduce_the_stored_values():
    expected = load()
    changed = differences(expected, golden_runs())
    assert not changed, (
        "The golden runs changed beyond a relative tolerance of "
        f"{RTOL:g}:\n" + "\n".join(changed) + "\nIf the change is intended, regenerate with "
        "`.venv/bin/python tests/golden_run.py --write` in a commit of its own that says why."
    )


def test_a_real_change_of_behaviour_is_caught():
    # One more power-iteration round per Spectron step: same maths, slightly better σ estimates. A refactor that
    # changed this by accident must fail the golden run, so the tolerance must be far below what it moves.
    expected = {"spectron": load()["spectron"]}
    changed = differences(expected, golden_runs(["spectron"], power_iters=2))
    assert any("update_norm_max" in line for line in changed), changed
