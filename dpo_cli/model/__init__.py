"""Models: load the base 4-bit (NF4) with LoRA adapters and a reference mode, open adapter folders, merge them.

Owns: load (and `scoring_model`, the plain view of a model that dpo/ scores), attention_support (which layout a
model can run), adapter, reference_adapter (a run started from an adapter: which weights are the policy, which the
reference), merge. May import: config, errors, files, output_folder, dpo; never data or run.
"""
