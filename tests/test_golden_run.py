"""A refactor changes no number: the golden runs (tests/golden_run.py) are bit-identical on CPU."""

import json

from golden_run import GOLDEN, golden_runs


def test_golden_runs_are_bit_identical():
    expected = json.loads(GOLDEN.read_text())
    results = golden_runs()
    assert set(results) == set(expected)
    for name in expected:
        assert results[name]["loss"] == expected[name]["loss"], name
        assert results[name]["grad_norm"] == expected[name]["grad_norm"], name
        assert results[name]["update_norm_max"] == expected[name]["update_norm_max"], name
        assert results[name]["weights_sha256"] == expected[name]["weights_sha256"], name
