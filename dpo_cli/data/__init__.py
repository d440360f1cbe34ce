"""Preference data: read every format and container, check each record, tokenize as TRL does, cache the result.

Owns: formats (what a record looks like), readers (files and containers), records (pairs and problems),
tokenize, cache, check (`dpo-cli data check`). May import: config, errors, files. Never a model.
"""
