"""How `dpo-cli sample` and each round of `dpo-cli iterate` sample, score and pair: declared once.

Each field carries its flag and help in its metadata (`flag`, `help`, and `flag_in` where a command names it
otherwise: iterate's `--batch-size` is training's, so its sampling batch is `--sample-batch-size`); the CLI builds both
commands' options from these fields (cli.sampling_flags). Light on purpose (no torch): the CLI imports it to build
its options before any command runs.
"""

from __future__ import annotations

import dataclasses
import math

from dpo_cli.errors import UserError
from dpo_cli.online.pairing import PAIRINGS


def _option(default, flag: str, help: str, **more):
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**factory, metadata={"flag": flag, "help": help, **more})


@dataclasses.dataclass
class SamplingOptions:
    num_samples: int = _option(4, "--num-samples", "Completions per prompt.")
    max_new_tokens: int = _option(64, "--max-new-tokens", "Length limit of every sample, cut to the model's context.")
    temperature: float = _option(1.0, "--temperature", "Sampling temperature (1.0: the model's own).")
    top_p: float = _option(1.0, "--top-p", "Nucleus sampling mass (1.0: off).")
    seed: int = _option(
        0, "--seed", "Each sample's random stream derives from it (iterate: round r samples under seed + r)."
    )
    batch_size: int = _option(
        32,
        "--batch-size",
        "Sequences (prompts x samples) generated together.",
        flag_in={"iterate": "--sample-batch-size"},
    )
    pairing: str = _option("max-min", "--pairing", "max-min, max-random or all.")
    min_margin: float = _option(0.0, "--min-margin", "Drop pairs whose rewards differ by less.")
    missing_eos_penalty: float = _option(
        0.0, "--missing-eos-penalty", "Subtracted from the reward of a completion that hit the length limit."
    )
    reward_weights: list[float] = _option([], "--reward-weights", "One weight per --reward (default 1).")
    reward_quantize: bool = _option(False, "--reward-4bit", "Load a reward model 4-bit (NF4).")

    def check(self) -> None:
        """One line for a value no run could use, before anything loads."""
        if self.num_samples < 2:
            raise UserError(f"--num-samples {self.num_samples}: a pair needs at least 2 samples per prompt")
        if self.pairing not in PAIRINGS:
            raise UserError(f"--pairing {self.pairing}: unknown; use one of {', '.join(PAIRINGS)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature {self.temperature}: must be a positive number (1.0 samples the model)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be positive")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size {self.batch_size}: must be positive")
        if not (self.min_margin >= 0 and math.isfinite(self.min_margin)):
            raise UserError(f"--min-margin {self.min_margin}: must be 0 or a positive number")
        if not (self.missing_eos_penalty >= 0 and math.isfinite(self.missing_eos_penalty)):
            raise UserError(f"--missing-eos-penalty {self.missing_eos_penalty}: must be 0 or a positive number")


def sampling_flag(field: dataclasses.Field, command: str) -> str:
    """The flag `command` gives a SamplingOptions field."""
    return field.metadata.get("flag_in", {}).get(command) or field.metadata["flag"]
