"""Reference log-probs computed once before training (`dpo.precompute_ref`), as TRL's `precompute_ref_log_probs`.

The reference is the base model with the adapters disabled, so it never changes during training: scoring it once
over the training pairs saves one forward pass per step (of about four: the policy's forward and backward). The
values are kept beside the pairs as a (num_pairs, 2) tensor, data rather than layout: a step hands its rows to
`score_batch(..., ref_logps=...)`, which then skips the reference pass. The values are what the losses see:
LD-weighted when `dpo.ld_alpha` is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.config import DpoSection
from dpo_cli.dpo.scoring import reference_sequence_logps, scored_batches
from dpo_cli.model.load import scoring_model
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
    scoring = scoring_model(model)
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

    def reference(batch):
        return reference_sequence_logps(scoring, batch, dpo.ld_alpha)

    try:
        with progress:
            task = progress.add_task("reference", total=len(pairs))
            for start, stop, ref_logps in scored_batches(pairs, pad_token_id, layout, batch_size, device, reference):
                ref_chosen, ref_rejected = ref_logps.chunk(2)
                values[start:stop, 0] = ref_chosen.float().cpu()
                values[start:stop, 1] = ref_rejected.float().cpu()
                progress.update(task, completed=stop)
    finally:
        model.train(was_training)
    return values
