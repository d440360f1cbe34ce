"""Supervised fine-tuning (`dpo-cli sft`): the SFT objective, run by the same `build_run`/`fit` as DPO.

Owns the objective (objective.py: collate, loss and metrics, evaluation). Its data is read by data/ (sft_formats.py)
and laid out by dpo/layouts.py (`collate_sft`); everything else a run does is run/'s. May import: config, data, dpo,
model, run (objective, distributed, metrics), errors.
"""
