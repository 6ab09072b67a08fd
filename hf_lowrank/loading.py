"""Reading a saved model for a command (`convert`, `evaluate`): only safetensors, and only weights that fit the config.

`from_pretrained` would unpickle a ``pytorch_model.bin`` (refused by ``weights_only=True`` with torch's advice to
re-run with ``weights_only=False``, which would run the payload), draw missing tensors at random with only a log line,
and stop at a mis-shaped one with a traceback that does not name it. Here each is a one-line `ValueError` (exit 2)
before anything is written (R7, R31, R32).
"""

from __future__ import annotations

from pathlib import Path

PICKLED_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def refuse_pickled_weights(source: str | Path) -> None:
    """Refuse a local folder whose weights are pickle files only (no ``*.safetensors``); the files are not opened."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHT_PATTERNS for p in folder.glob(pattern))
    if pickled:
        raise ValueError(
            f"{str(source)!r} holds its weights as pickle files ({', '.join(pickled[:3])}) and no safetensors. Only "
            "safetensors weights are read: loading a pickle can run code, so the file was not opened. Convert it to "
            "safetensors where you trust it came from (e.g. load it there and save_pretrained)."
        )


def check_safetensors_readable(source: str | Path) -> None:
    """Refuse a local folder with a safetensors file whose header cannot be read (torn, or not safetensors at all),
    naming the file; ``from_pretrained`` would fail with a bare ``SafetensorError`` traceback."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable safetensors file (torn, or not safetensors): {error}. Restore it."
            ) from None


def check_weights_loaded(model_name: str, loading: dict, command: str = "read") -> None:
    """Refuse a model whose weights do not fit its config (``from_pretrained(..., output_loading_info=True)``'s
    report): missing tensors would be random, unexpected or mis-shaped ones mean another model. ``command`` says
    what was not done ("evaluated", "converted", ...)."""
    missing, unexpected = sorted(loading.get("missing_keys", ())), sorted(loading.get("unexpected_keys", ()))
    mismatched = sorted(
        str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in loading.get("mismatched_keys", ())
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for keys, what in (
                (missing, "model tensors missing from the weights, which would be random"),
                (unexpected, "tensors in the weights that the model does not have"),
                (mismatched, "tensors of the wrong shape"),
            )
            if keys
        ]
        raise ValueError(
            f"The weights in {model_name!r} do not fit its config: {'; '.join(parts)}. Nothing was {command}. Check that "
            "config.json and the weights come from the same model (convert Llama weights with "
            "`hf-lowrank convert --from_dense`)."
        )


def load_causal_lm(source: str | Path, command: str = "read", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)`` for a command that reads weights: pickled weights
    are refused unopened, and every tensor must be present and of the config's shape (``command``: what the refusal
    says was not done)."""
    from transformers import AutoModelForCausalLM

    refuse_pickled_weights(source)
    check_safetensors_readable(source)
    model, loading = AutoModelForCausalLM.from_pretrained(
        source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    check_weights_loaded(str(source), loading, command)
    return model
