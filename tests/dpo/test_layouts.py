"""The packed and shared-prompt layouts: their tensors written out by hand, and the same numbers as the padded
layout (TRL's) on real models: loss, rewards, log-probs and LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.config import DpoSection, ModelSection
from dpo_cli.data.records import read_jsonl
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.dpo import scoring
from dpo_cli.dpo.attention import flex_block_mask, model_attention_mask
from dpo_cli.dpo.layouts import collate, collate_packed, collate_padded, collate_shared_prompt
from dpo_cli.dpo.scoring import score_batch, scored_batches
from dpo_cli.model.attention_support import resolve_layout, unsupported_reason
from dpo_cli.model.load import add_lora, load_base_model, load_tokenizer, scoring_model

TWO_PAIRS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]


def mask_rows(text_rows: list[str]) -> list[list[bool]]:
    """A mask drawn as strings, one per query: '1' = may attend to that key, '.' = may not."""
    return [[char == "1" for char in row] for row in text_rows]


# The layout tensors, by hand ---------------------------------------------------------------------------------------


def test_packed_layout_tensors_by_hand():
    # Budget 8: first-fit decreasing puts chosen 0 (5 tokens) with chosen 1 (3), rejected 0 (4) with rejected 1 (4).
    batch = collate_packed(TWO_PAIRS, pad_token_id=0, row_tokens=8)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9], [1, 2, 3, 6, 7, 8, 10, 11]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3]]
    assert batch.attention_mask.tolist() == [[1] * 8, [1] * 8]
    # Chosen completions are 0 and 1, rejected ones 2 and 3; position t predicts token t+1 of its own sequence.
    assert batch.completion_index.tolist() == [[-1, -1, 0, 0, -1, -1, 1, -1], [-1, -1, 2, -1, -1, 3, 3, -1]]
    assert batch.target_ids.tolist() == [[0, 0, 4, 5, 0, 0, 9, 0], [0, 0, 6, 0, 0, 10, 11, 0]]
    # fmt: off
    assert batch.attention_allowed()[0].tolist() == mask_rows([
        "1.......",
        "11......",
        "111.....",
        "1111....",
        "11111...",
        ".....1..",
        ".....11.",
        ".....111",
    ])
    assert batch.attention_allowed()[1].tolist() == mask_rows([
        "1.......",
        "11......",
        "111.....",
        "1111....",
        "....1...",
        "....11..",
        "....111.",
        "....1111",
    ])
    # fmt: on
    assert batch.completion_lengths().tolist() == collate_padded(TWO_PAIRS, 0).completion_lengths().tolist()
    assert batch.num_tokens == collate_padded(TWO_PAIRS, 0).num_tokens


def test_shared_prompt_layout_tensors_by_hand():
    # Segments [prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected]: 7 and 6 tokens, one per row (budget 7).
    batch = collate_shared_prompt(TWO_PAIRS, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6], [7, 8, 9, 8, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    # Each branch's positions go on from the shared prompt's; both branches start at the prompt's last token.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 0]]
    assert batch.branch_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 0]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, -1]]
    assert batch.completion_index.tolist() == [[-1, -1, 0, 0, -1, 2, -1], [-1, 1, -1, 3, 3, -1, -1]]
    assert batch.target_ids.tolist() == [[0, 0, 4, 5, 0, 6, 0], [0, 9, 0, 10, 11, 0, 0]]
    # The rejected branch sees the shared prompt and itself, never the chosen branch; padding sees only itself.
    # fmt: off
    assert batch.attention_allowed()[0].tolist() == mask_rows([
        "1......",
        "11.....",
        "111....",
        "1111...",
        "11111..",
        "11...1.",
        "11...11",
    ])
    assert batch.attention_allowed()[1].tolist() == mask_rows([
        "1......",
        "11.....",
        "111....",
        "1..1...",
        "1..11..",
        "1..111.",
        "......1",
    ])
    # fmt: on
    assert batch.completion_lengths().tolist() == collate_padded(TWO_PAIRS, 0).completion_lengths().tolist()
    # 13 tokens run instead of 16, but tokens/s counts the pairs' sequences, as in any layout.
    assert int(batch.attention_mask.sum()) == 13
    assert batch.num_tokens == collate_padded(TWO_PAIRS, 0).num_tokens == 16


def test_an_empty_prompt_scores_what_the_padded_layout_scores():
    pairs = [{"prompt_ids": [], "chosen_ids": [3, 4, 5], "rejected_ids": [6, 7]}]
    padded = collate_padded(pairs, 0).completion_lengths().tolist()
    for layout in ("packed", "shared-prompt"):
        batch = collate(layout, pairs, 0)
        assert batch.completion_lengths().tolist() == padded == [2, 1], layout
    shared = collate_shared_prompt(pairs, 0)
    assert shared.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert shared.attention_allowed()[0, 3].tolist() == [False, False, False, True, False]


def test_packing_never_makes_more_or_wider_rows_than_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (12, 3), generator=generator).tolist()
    pairs = [{"prompt_ids": [5] * p, "chosen_ids": [6] * c, "rejected_ids": [7] * r} for p, c, r in lengths]
    padded = collate_padded(pairs, 0)
    packed = collate_packed(pairs, 0)
    assert packed.input_ids.shape[0] <= padded.input_ids.shape[0]
    assert packed.input_ids.shape[1] <= padded.input_ids.shape[1]
    assert packed.num_tokens == padded.num_tokens
    assert torch.equal(packed.completion_lengths(), padded.completion_lengths())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: no compiler
def test_flex_block_mask_is_the_same_rule():
    """The BlockMask's mask_mod, evaluated at every (query, key), is `attention_allowed()`; and flex attention with it
    equals sdpa with the dense mask (uncompiled flex, forward only: CPU flex has no backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    batch = collate_shared_prompt(TWO_PAIRS, pad_token_id=0)
    block_mask = flex_block_mask(batch)
    rows, width = batch.input_ids.shape
    q_idx = torch.arange(width)[:, None].expand(width, width)
    kv_idx = torch.arange(width)[None, :].expand(width, width)
    for row in range(rows):
        rule = block_mask.mask_mod(torch.tensor(row), torch.tensor(0), q_idx, kv_idx)
        assert torch.equal(rule, batch.attention_allowed()[row]), row

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(rows, 2, width, 8, generator=generator) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=batch.attention_allowed()[:, None]
    )
    flex = flex_attention(query, key, value, block_mask=block_mask)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


# Same numbers as padded, on real models ----------------------------------------------------------------------------

PAIRS = 6
DPO_SETTINGS = {
    "sigmoid": {},
    "ipo": {"loss_type": ["ipo"]},
    "ld-dpo": {"ld_alpha": 0.5},  # reads per-token log-probs: which tokens are in each completion's tail
    "wpo": {"use_weighting": True},  # reads per-token log-probs and log Σ p²
}


def _lora_model(model_path):
    from dpo_cli.config import LoraSection
    from tests.trl_oracle import randomize_lora

    base = load_base_model(ModelSection(path=str(model_path), gradient_checkpointing=False), torch.device("cpu"))
    model = add_lora(base, LoraSection(), gradient_checkpointing=False)
    randomize_lora(model, seed=0)  # policy != reference, so rewards and their gradients are not zero
    model.train()
    return model


def _pairs(model_path, data_path, max_length):
    tokenizer = load_tokenizer(str(model_path))
    pairs, _ = tokenize_pairs(tokenizer, list(read_jsonl(data_path))[:PAIRS], max_length)
    return pairs, tokenizer.pad_token_id


def _scores_and_grads(model, batch, dpo):
    scores = score_batch(scoring_model(model), batch, dpo)
    scores.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return scores, grads


def _assert_same_numbers(model, pairs, pad_token_id, layout, dpo):
    padded, padded_grads = _scores_and_grads(model, collate_padded(pairs, pad_token_id), dpo)
    batch = collate(layout, pairs, pad_token_id)
    assert batch.is_packed
    ours, grads = _scores_and_grads(model, batch, dpo)

    close = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours.loss, padded.loss, **close)
    torch.testing.assert_close(ours.losses, padded.losses, **close)
    torch.testing.assert_close(ours.chosen_rewards, padded.chosen_rewards, **close)
    torch.testing.assert_close(ours.rejected_rewards, padded.rejected_rewards, **close)
    torch.testing.assert_close(ours.logps.chosen, padded.logps.chosen, **close)
    torch.testing.assert_close(ours.logps.rejected, padded.logps.rejected, **close)
    torch.testing.assert_close(ours.policy.sums, padded.policy.sums, **close)
    assert torch.equal(ours.policy.lengths, padded.policy.lengths)
    # Per token too: the same tokens, each completion's in order (completions may come in another order). A single
    # token's log-prob moves by up to ~5e-5 when attention sums its row in another order (other widths, other
    # kernel blocks), which the sums above average out; a wrong mask moves it by whole units.
    for completion in range(2 * len(pairs)):
        mine = ours.policy.token_logps[ours.policy.token_completion == completion]
        theirs = padded.policy.token_logps[padded.policy.token_completion == completion]
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=2e-4)
    assert abs(float(padded.chosen_rewards.sub(padded.rejected_rewards).abs().max())) > 1e-4, "rewards not trivial"

    assert grads.keys() == padded_grads.keys() and grads, "every LoRA weight gets a gradient in both layouts"
    for name, grad in grads.items():
        scale = float(padded_grads[name].abs().max())
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.fixture(scope="module")
def tiny_setup(tiny_demo):
    return _lora_model(tiny_demo["model"]), *_pairs(tiny_demo["model"], tiny_demo["train"], max_length=64)


@pytest.fixture(scope="module")
def stories_setup(stories_model, stories_data):
    return _lora_model(stories_model), *_pairs(stories_model, stories_data["train"], max_length=96)


@pytest.mark.parametrize("layout", ["packed", "shared-prompt"])
@pytest.mark.parametrize("settings", DPO_SETTINGS.values(), ids=DPO_SETTINGS.keys())
def test_tiny_model_layouts_equal_padded(tiny_setup, layout, settings):
    model, pairs, pad_token_id = tiny_setup
    _assert_same_numbers(model, pairs, pad_token_id, layout, DpoSection(**settings))


@pytest.mark.parametrize("layout", ["packed", "shared-prompt"])
@pytest.mark.parametrize("settings", DPO_SETTINGS.values(), ids=DPO_SETTINGS.keys())
def test_stories_4bit_layouts_equal_padded(stories_setup, layout, settings):
    model, pairs, pad_token_id = stories_setup
    _assert_same_numbers(model, pairs, pad_token_id, layout, DpoSection(**settings))


def test_eager_attention_gets_an_additive_mask_with_the_same_numbers(tiny_setup):
    """eager adds the mask to the scores: a boolean there would be silently wrong, so it must get 0 / -inf."""
    model, pairs, pad_token_id = tiny_setup
    model.set_attn_implementation("eager")
    try:
        batch = collate_shared_prompt(pairs, pad_token_id)
        scored = scoring_model(model)
        assert scored.attention_backend == "eager"
        mask = model_attention_mask(batch, scored.attention_backend, scored.mask_dtype)
        assert mask.dtype.is_floating_point and float(mask.max()) == 0.0
        _assert_same_numbers(model, pairs, pad_token_id, "shared-prompt", DpoSection())
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("layout", ["padded", "packed", "shared-prompt"])
def test_reference_logps_handed_in_replace_the_reference_pass(tiny_setup, layout, monkeypatch):
    """`score_batch(..., ref_logps)` gives the live reference's numbers in every layout, and runs no reference pass:
    precomputed reference log-probs are data beside the batch, not part of its layout."""
    model, pairs, pad_token_id = tiny_setup
    scored, dpo = scoring_model(model), DpoSection(beta=0.3)
    batch = collate(layout, pairs, pad_token_id)
    with torch.no_grad():
        live = score_batch(scored, batch, dpo)
        ref_logps = torch.stack([live.logps.ref_chosen, live.logps.ref_rejected], dim=1)  # (P, 2)
        monkeypatch.setattr(scoring, "reference_logps", None)  # a reference pass would fail
        handed_in = score_batch(scored, batch, dpo, ref_logps=ref_logps)
    torch.testing.assert_close(handed_in.losses, live.losses)
    torch.testing.assert_close(handed_in.chosen_rewards, live.chosen_rewards)
    torch.testing.assert_close(handed_in.rejected_rewards, live.rejected_rewards)


# Which models can run a packed layout ------------------------------------------------------------------------------


def test_a_short_sliding_window_falls_back_to_padded_with_the_reason():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=32,
    )
    model = MistralForCausalLM(config)
    layout, note = resolve_layout("packed", model, max_length=128)
    assert layout == "padded"
    assert note.startswith("layout packed runs padded: ") and "sliding-window" in note and "32" in note
    assert resolve_layout("auto", model, max_length=128)[0] == "padded"
    # A window no sequence can reach never bites, so the mask loses nothing.
    assert unsupported_reason(model, max_length=32) is None


def test_a_plain_llama_runs_every_layout(tiny_setup):
    model, _, _ = tiny_setup
    for layout in ("padded", "packed", "shared-prompt"):
        assert resolve_layout(layout, model, max_length=64) == (layout, None)
    assert resolve_layout("auto", model, max_length=64) == ("shared-prompt", None)


# The setting, through training ---------------------------------------------------------------------------------------


def test_the_layout_setting_is_checked_and_reached_by_the_flag():
    from dpo_cli.config import recipe_from_dict
    from dpo_cli.errors import UserError
    from dpo_cli.flags import overrides_from_flags

    assert recipe_from_dict({}).data.layout == "auto"
    assert overrides_from_flags({"data.layout": "shared-prompt"}) == {"data": {"layout": "shared-prompt"}}
    with pytest.raises(UserError, match="data.layout: 'packd' is not one of auto, padded, packed, shared-prompt"):
        recipe_from_dict({"data": {"layout": "packd"}})


def _three_steps(tiny_demo, output_dir, layout, checkpointing=False, **dpo):
    """(per-step records, eval metrics, the layout run) of 3 steps of 2 micro-batches on the 4-bit tiny demo."""
    from rich.console import Console

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.run.callbacks import evaluate
    from dpo_cli.run.loop import train_step
    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": str(tiny_demo["model"]), "gradient_checkpointing": checkpointing},
            "data": {
                "train": [str(tiny_demo["train"])],
                "eval": [str(tiny_demo["test"])],
                "layout": layout,
                "cache_dir": f"{output_dir}-cache",  # each run scores its own reference, in its own layout
            },
            "training": {
                "output_dir": str(output_dir),
                "max_steps": 3,
                "batch_size": 4,
                "grad_accum": 2,
                "eval_batch_size": 5,
                "lr": 1e-2,
                "save_steps": 0,
            },
            "dpo": {"beta": 0.5, **dpo},
        }
    )
    run = build_run(recipe, console=Console(quiet=True))
    records = [train_step(run) for _ in range(3)]
    return records, evaluate(run), run.layout


@pytest.mark.parametrize(
    ("layout", "dpo"),
    [
        ("packed", {}),
        ("shared-prompt", {}),
        ("shared-prompt", {"ld_alpha": 0.5, "precompute_ref": True}),
        ("shared-prompt", {"use_weighting": True, "checkpointing": True}),  # the mask reaches recomputed layers
    ],
    ids=["packed", "shared-prompt", "shared-prompt-ld-precomputed", "shared-prompt-wpo-checkpointing"],
)
def test_training_steps_and_eval_equal_the_padded_layout(tiny_demo, tmp_path, monkeypatch, layout, dpo):
    from dpo_cli.run import evaluate, reference
    from dpo_cli.run import objective as train  # the DPO objective collates the steps' batches

    padded, padded_eval, _ = _three_steps(tiny_demo, tmp_path / "padded", "padded", **dpo)
    collated = {}  # module -> layouts its batches were built in

    def spy(module):
        def collate_and_note(chosen_layout, *args):
            collated.setdefault(module.__name__, set()).add(chosen_layout)
            return collate(chosen_layout, *args)

        monkeypatch.setattr(module, "collate", collate_and_note)

    def spy_scored_batches(module):
        """eval and the reference precompute batch through dpo.scoring.scored_batches, which collates in `layout`."""

        def scored_batches_and_note(pairs, pad_token_id, chosen_layout, *args):
            collated.setdefault(module.__name__, set()).add(chosen_layout)
            return scored_batches(pairs, pad_token_id, chosen_layout, *args)

        monkeypatch.setattr(module, "scored_batches", scored_batches_and_note)

    spy(train)
    for module in (evaluate,) + ((reference,) if dpo.get("precompute_ref") else ()):
        spy_scored_batches(module)
    ours, our_eval, ran = _three_steps(tiny_demo, tmp_path / layout, layout, **dpo)
    assert ran == layout
    assert all(layouts == {layout} for layouts in collated.values()), collated
    assert len(collated) == (3 if dpo.get("precompute_ref") else 2), "steps, eval (and the reference) use it"
    for step_padded, step_ours in zip(padded, ours, strict=True):
        assert step_ours["num_tokens"] == step_padded["num_tokens"], "tokens/s counts the same tokens"
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
            assert step_ours[key] == pytest.approx(step_padded[key], rel=1e-4, abs=1e-6), (step_ours["step"], key)
    assert padded[-1]["loss"] < padded[0]["loss"], "the policy moves, so later steps compare a trained adapter"
    for key, value in padded_eval.items():
        assert our_eval[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
