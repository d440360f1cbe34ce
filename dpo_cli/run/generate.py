"""Samples from the policy and from the reference for the same prompts, side by side, for reading or for a judge.

Both sample the model's own distribution (temperature 1, no top-k or top-p): that is the distribution DPO's objective
is about, so it is where a change made by the adapter shows. Each chunk of prompts is sampled under the same seed for
the policy and for the reference, so reruns give the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dpo_cli.errors import UserError
from dpo_cli.model.load import reference_mode


def distinct_prompts(pairs: Sequence[Mapping], count: int) -> list[int]:
    """Indices of the first `count` pairs with different prompts (several pairs often share one)."""
    seen: set[tuple[int, ...]] = set()
    indices = []
    for index, pair in enumerate(pairs):
        key = tuple(pair["prompt_ids"])
        if key not in seen:
            seen.add(key)
            indices.append(index)
            if len(indices) == count:
                break
    return indices


def new_token_budget(model, prompt_lengths: list[int], requested: int) -> tuple[int, str | None]:
    """(new tokens to sample, a note when fewer than `requested`): a model attends to at most
    max_position_embeddings positions, and sampling past them runs for minutes to give text the model never saw
    the like of. Prompts are left-padded to the longest, so the longest one sets the room left."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
        return requested, None  # a model without a fixed context: nothing to cap against
    longest = max(prompt_lengths, default=0)
    room = context - longest
    if room <= 0:
        raise UserError(
            f"--generate: the longest prompt sampled ({longest} tokens) fills the model's whole context "
            f"({context} tokens, max_position_embeddings); lower data.max_length or --generate"
        )
    if requested <= room:
        return requested, None
    return room, (
        f"--max-new-tokens {requested}: capped at {room}, what the model's {context}-token context "
        f"(max_position_embeddings) leaves after the longest prompt sampled ({longest} tokens)"
    )


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): generation appends on the right, so padding goes on the left."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def sample(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled completion per prompt, as text; stops at EOS or after `max_new_tokens`."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    return tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)


def sample_side_by_side(
    model,
    tokenizer,
    pairs: Sequence[Mapping],
    indices: list[int],
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """One row per pair in `indices`: where it came from, its prompt, a policy sample and a reference sample."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [list(pairs[i]["prompt_ids"]) for i in chunk]
            policy = sample(model, tokenizer, prompts, max_new_tokens, seed + start)
            with reference_mode(model):
                reference = sample(model, tokenizer, prompts, max_new_tokens, seed + start)
            for index, prompt, policy_text, reference_text in zip(chunk, prompts, policy, reference, strict=True):
                rows.append(
                    {
                        "index": index,
                        "source": pairs[index].get("source", ""),
                        "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                        "policy": policy_text,
                        "reference": reference_text,
                    }
                )
            if on_batch is not None:
                on_batch(len(chunk))
    return rows
