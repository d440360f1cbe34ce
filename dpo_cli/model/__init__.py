"""Models: load the base 4-bit (NF4) with LoRA adapters and a reference mode, open adapter folders, merge them.

Owns: load, adapter, merge. May import: config, errors, files, output_folder; never data or run.
"""
