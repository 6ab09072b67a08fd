"""Training: data pipeline (`data`, `tokenizer`), Trainer pieces and the pretraining entry point.

Submodules are imported where used, so importing `hf_lowrank.training` stays cheap.
"""
