"""Experiments that produce the numbers in ``docs/``: each is a module with the logic and a thin script in
``scripts/``, so the numbers come from the same code users run and a test can exercise it in seconds."""
