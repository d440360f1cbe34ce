"""The padded layout must be TRL's: the same rows, mask and (shifted) completion positions."""

from __future__ import annotations

import torch

from dpo_cli.dpo.layouts import collate_padded


def test_padded_layout_equals_trl_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pairs = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    ours = collate_padded(pairs, pad_token_id=0)
    theirs = DataCollatorForPreference(pad_token_id=0)(pairs)

    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    # TRL scores position t when token t+1 is a completion token: completion_mask[:, 1:].
    assert torch.equal(ours.scored[:, :-1].long(), theirs["completion_mask"][:, 1:])
    assert not ours.scored[:, -1].any()
    assert torch.equal(ours.target_ids[:, :-1], ours.input_ids[:, 1:] * ours.attention_mask[:, 1:])


def test_completion_index_puts_chosen_first_then_rejected():
    pairs = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
        {"prompt_ids": [1], "chosen_ids": [6], "rejected_ids": [7, 8, 9]},
    ]
    batch = collate_padded(pairs, pad_token_id=0)
    assert batch.completion_index.tolist() == [
        [-1, 0, 0, -1],  # row 0: prompt [1,2] + chosen [3,4]: positions 1,2 predict 3,4
        [1, -1, -1, -1],  # row 1: prompt [1] + chosen [6]
        [-1, 2, -1, -1],  # row 2: prompt [1,2] + rejected [5]
        [3, 3, 3, -1],  # row 3: prompt [1] + rejected [7,8,9]
    ]
    assert batch.completion_lengths().tolist() == [2, 1, 1, 3]
    assert batch.num_tokens == 4 + 2 + 3 + 4


def test_completion_with_no_prompt_tokens_skips_the_unpredictable_first_token():
    batch = collate_padded([{"prompt_ids": [], "chosen_ids": [3, 4, 5], "rejected_ids": [6, 7]}], pad_token_id=0)
    assert batch.completion_index.tolist() == [[0, 0, -1], [1, -1, -1]]
