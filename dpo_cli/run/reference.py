"""Reference log-probs computed once before training (`dpo.precompute_ref`), as TRL's `precompute_ref_log_probs`.

The reference is the base model with the adapters disabled, so it never changes during training: scoring it once
over the training pairs saves one forward pass per step (of about four: the policy's forward and backward). The
values are kept beside the pairs as a (num_pairs, 2) tensor rather than written into them, and `with_reference`
hands a pair to the layout with its two numbers attached; the layout puts them in the batch, and `score_batch` then
skips the reference pass. The values are what the losses see: LD-weighted when `dpo.ld_alpha` is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.config import DpoSection
from dpo_cli.dpo.layouts import collate
from dpo_cli.dpo.scoring import reference_sequence_logps
from dpo_cli.run.distributed import is_main_process

PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def precompute_reference_logps(
    model,
    pairs: Sequence[Mapping],
    pad_token_id: int,
    dpo: DpoSection,
    batch_size: int,
    console: Console,
    layout: str = "padded",
) -> torch.Tensor:
    """(num_pairs, 2) float32 reference log-probs of each pair's (chosen, rejected), in the order of `pairs`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values = torch.empty((len(pairs), 2), dtype=torch.float32)
    progress = Progress(
        TextColumn("[bold]reference log-probs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process(),
    )
    try:
        with progress:
            task = progress.add_task("reference", total=len(pairs))
            for start in range(0, len(pairs), batch_size):
                stop = min(start + batch_size, len(pairs))
                batch = collate(layout, [pairs[i] for i in range(start, stop)], pad_token_id).to(device)
                ref_chosen, ref_rejected = reference_sequence_logps(model, batch, dpo).chunk(2)
                values[start:stop, 0] = ref_chosen.float().cpu()
                values[start:stop, 1] = ref_rejected.float().cpu()
                progress.update(task, completed=stop)
    finally:
        model.train(was_training)
    return values


def with_reference(pair: Mapping, ref_logps: torch.Tensor) -> dict:
    """A new mapping of `pair`'s token ids plus its precomputed (chosen, rejected) reference log-probs."""
    return {
        **{key: pair[key] for key in PAIR_KEYS},
        "ref_chosen_logps": float(ref_logps[0]),
        "ref_rejected_logps": float(ref_logps[1]),
    }
