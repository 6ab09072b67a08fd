"""Test observer for launched training runs; inert unless ``HF_LOWRANK_TEST_DIGEST_DIR`` is set.

tests/test_distributed.py puts this folder on ``PYTHONPATH`` so that the documented launch commands run verbatim
and still report each rank's state: in every launched worker (``LOCAL_RANK`` set), when ``Trainer.train``
returns, this writes ``rank<RANK>.json`` with SHA-256 digests of the parameters and of the optimizer state.
"""

import os

if os.environ.get("HF_LOWRANK_TEST_DIGEST_DIR") and "LOCAL_RANK" in os.environ:
    import hashlib
    import json
    from pathlib import Path

    import torch
    from transformers import Trainer

    _train = Trainer.train

    def _digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _train_and_report(self, *args, **kwargs):
        result = _train(self, *args, **kwargs)
        state = self.optimizer.state_dict()["state"]
        optimizer_tensors = [
            value for index in sorted(state) for _, value in sorted(state[index].items()) if torch.is_tensor(value)
        ]
        report = {
            "global_step": self.state.global_step,
            "world_size": self.args.world_size,
            "parameters": _digest(p for _, p in sorted(self.model.named_parameters())),
            "optimizer_state": _digest(optimizer_tensors),
            "optimizer_tensors": len(optimizer_tensors),
        }
        path = Path(os.environ["HF_LOWRANK_TEST_DIGEST_DIR"]) / f"rank{os.environ['RANK']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))
        return result

    Trainer.train = _train_and_report
