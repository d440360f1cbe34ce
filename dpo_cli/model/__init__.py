"""Models: load the base 4-bit (NF4) with LoRA adapters and a reference mode, open adapter folders, merge them.

Owns: load (and `scoring_model`, the plain view of a model that dpo/ scores), base_weights (a base's weight files
against its config, before anything is allocated), attention_support (which layout a model can run), adapter (and
`check_adapter_weights`, which every adapter load goes through), reference_adapter (a run started from an adapter:
which weights are the policy, which the reference), merge. May import: config, errors, files, output_folder, dpo;
never data or run.
"""
