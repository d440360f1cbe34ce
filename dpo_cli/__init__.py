"""dpo-cli: Direct Preference Optimization on a 4-bit base with LoRA adapters, from the command line."""

__version__ = "0.1.0"
