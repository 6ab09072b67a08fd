"""Training memory of one (shape, model, optimizer) configuration, each in a fresh process.

torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see it, so the peak is the resident set:
the child process records its RSS after imports, builds the model and optimizer, takes one training step (which
creates the optimizer state), resets the kernel's high-water mark (``/proc/self/clear_refs``) and takes more
steps; ``peak − RSS after imports`` is the memory training needs at its worst moment: weights, gradients,
optimizer state, activations and temporaries. glibc is told to return every block of 64 KiB or more to the
kernel when freed (``MALLOC_MMAP_THRESHOLD_``), so the RSS follows live tensors instead of the allocator's cache.
Tensor bytes (weights, gradients, optimizer state) are also counted exactly from the tensors.

Linux only (``/proc/self/status``). Run a child by hand: ``python -m hf_lowrank.bench.memory SHAPE_JSON VARIANT``.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

VARIANTS = ("dense_adamw", "factorized_adamw", "factorized_spectron")
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def analytic_model_state_bytes(config, optimizer: str, bytes_per_element: int = 4) -> int:
    """Weights + gradients + optimizer state of ``config`` trained by ``optimizer`` ("adamw" or "spectron"),
    from the parameter count alone: AdamW keeps two moments per weight; Spectron one momentum per factor (and its
    r- and long-vectors, negligible) and AdamW's two moments for embeddings, LM head and norms."""
    from ..configuration_lowrank import count_parameters

    count = count_parameters(config)
    others = count.embeddings + count.norms
    if optimizer == "adamw":
        return 4 * (count.projections + others) * bytes_per_element
    if optimizer == "spectron":
        if config.is_dense:
            raise ValueError("Spectron trains factor pairs; a dense config has none.")
        return (3 * count.projections + 4 * others) * bytes_per_element
    raise ValueError(f"optimizer must be 'adamw' or 'spectron', got {optimizer!r}.")


def analytic_preset_ratios(presets=("130m", "350m", "1b")) -> list[dict]:
    """Model-state memory of factorized + Spectron relative to dense + AdamW for full-depth presets."""
    from ..presets import dense_counterpart, preset_config

    rows = []
    for name in presets:
        config = preset_config(name)
        factorized = analytic_model_state_bytes(config, "spectron")
        dense = analytic_model_state_bytes(dense_counterpart(config), "adamw")
        rows.append(
            {
                "preset": name,
                "factorized_spectron_bytes": factorized,
                "dense_adamw_bytes": dense,
                "ratio": factorized / dense,
            }
        )
    return rows


def measure_here(shape, variant: str, steps: int = 2) -> dict:
    """Measure ``variant`` of ``shape`` in this process (meant to be a fresh one)."""
    import torch

    from ..optim import build_optimizer
    from .suite import adamw, build_model

    if variant not in VARIANTS:
        raise ValueError(f"Unknown memory variant {variant!r}; choose from {list(VARIANTS)}.")
    rss_start = _status_kib("VmRSS") * 1024
    model = build_model(shape, factorized=variant.startswith("factorized"))
    optimizer = build_optimizer(model, "spectron", lr=1e-3) if variant.endswith("spectron") else adamw(model)
    batch = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), generator=torch.Generator())

    def step() -> int:
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        grad_bytes = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return grad_bytes

    step()
    _reset_peak()
    rss_steady = _status_kib("VmRSS") * 1024
    grad_bytes = max(step() for _ in range(steps))
    peak = _status_kib("VmHWM") * 1024
    param_bytes = _tensor_bytes(model.parameters())
    state_bytes = _tensor_bytes(
        t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    )
    return {
        "variant": variant,
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "model_state_bytes": param_bytes + grad_bytes + state_bytes,
        "peak_bytes": peak - rss_start,
        "between_steps_bytes": rss_steady - rss_start,
    }


def measure_in_subprocess(shape, variant: str, timeout: float = 900) -> dict:
    """Run :func:`measure_here` in a fresh Python process and return its result."""
    env = {**os.environ, **_CHILD_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.bench.memory", json.dumps(asdict(shape)), variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from .suite import BenchShape

    shape_json, variant = argv if argv is not None else sys.argv[1:]
    print(json.dumps(measure_here(BenchShape(**json.loads(shape_json)), variant)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
