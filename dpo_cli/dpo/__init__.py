"""The math of DPO, torch only: batch layouts and their attention masks, fused log-probs, losses, scoring.

Owns: layouts (padded, packed, shared-prompt), attention, logprobs, losses, scoring. May import: torch and the
standard library. It knows nothing of files, recipes or commands, so it can be read, tested and benchmarked alone.
"""
