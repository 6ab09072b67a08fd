"""The seconds-long `LowRankTrainer` the Trainer-level tests build: the `tiny` model (seed 0) on ``tiny_data``, with
the settings every one of them shares, and a trainer that records and poisons its batches.

Each test file keeps its own ``make_trainer`` with the defaults its tests rely on (steps, saving, schedule) and
calls `tiny_trainer` with them.
"""

import hashlib

from conftest import tiny_model
from transformers import TrainingArguments, default_data_collator

from hf_lowrank.training.arguments import OptimizerArguments
from hf_lowrank.training.trainer import LowRankTrainer

# TrainingArguments every tiny Trainer test uses; a test's own settings are laid over them.
TINY_TRAINING_ARGS = dict(
    per_device_train_batch_size=8,
    learning_rate=0.02,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    seed=0,
    dataloader_pin_memory=False,
    disable_tqdm=True,
)


class PoisonTrainer(LowRankTrainer):
    """Records a hash of every training batch, and multiplies the loss of chosen batches (1-based count of training
    forwards) by a factor: NaN/inf for a non-finite step, a large number for a loss spike."""

    def __init__(self, *args, poison=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.poison = poison or {}
        self.batch_hashes: list[str] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batch_hashes.append(hashlib.sha256(inputs["input_ids"].numpy().tobytes()).hexdigest())
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        factor = self.poison.get(len(self.batch_hashes)) if model.training else None
        return loss if factor is None else loss * factor


def tiny_trainer(
    output_dir,
    tiny_data,
    training_args: dict,
    *,
    trainer_class: type[LowRankTrainer] = LowRankTrainer,
    model_overrides: dict | None = None,
    train_blocks: int | None = None,
    optimizer: str = "spectron",
    optimizer_args: OptimizerArguments | None = None,
    **trainer_kwargs,
) -> LowRankTrainer:
    """A ``trainer_class`` over a fresh seed-0 `tiny` model (plus ``model_overrides``), trained on the first
    ``train_blocks`` blocks of ``tiny_data`` (all by default) and evaluated on its validation blocks, with
    `TINY_TRAINING_ARGS` overlaid by ``training_args``; ``optimizer`` with AdamW groups at 3e-3 unless
    ``optimizer_args`` is given. ``trainer_kwargs`` (``guard``, ``callbacks``, ``poison``...) go to the trainer."""
    tokenizer, train, evaluation = tiny_data
    return trainer_class(
        model=tiny_model(**(model_overrides or {})),
        args=TrainingArguments(output_dir=str(output_dir), **{**TINY_TRAINING_ARGS, **training_args}),
        train_dataset=train if train_blocks is None else train.select(range(train_blocks)),
        eval_dataset=evaluation,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizer_args=optimizer_args or OptimizerArguments(optimizer=optimizer, adamw_learning_rate=3e-3),
        **trainer_kwargs,
    )
