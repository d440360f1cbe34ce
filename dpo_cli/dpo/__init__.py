"""The math of DPO, torch only: batch layouts and their attention masks, fused log-probs, losses, scoring.

Owns: layouts (padded, packed, shared-prompt), attention (masks), logprobs, loss_specs (one spec per loss, standard
library only, so the recipe checks read it without torch), losses, scoring (score_batch, scored_batches). May import:
torch and the standard library. It knows nothing of files, recipes, commands or Hugging Face models: the model
arrives as a `scoring.ScoringModel` of plain values (model/ builds it), so it can be read, tested and benchmarked
alone (tests/test_import_boundaries.py holds it to that).
"""
