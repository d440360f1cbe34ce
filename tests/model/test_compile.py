"""`model.compile` (--compile): the compiled decoder layers give the numbers of the plain ones, in the padded and the
shared-prompt layout, with gradient checkpointing (training's default)."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.config import DpoSection, LoraSection, ModelSection
from dpo_cli.dpo.layouts import collate
from dpo_cli.errors import UserError
from dpo_cli.model.load import add_lora, compile_decoder_layers, load_base_model
from tests.dpo.test_layouts import _pairs, _scores_and_grads


def _model(model_path, checkpointing: bool):
    from tests.trl_oracle import randomize_lora

    section = ModelSection(path=str(model_path), gradient_checkpointing=checkpointing)
    model = add_lora(load_base_model(section, torch.device("cpu")), LoraSection(), checkpointing)
    randomize_lora(model, seed=0)  # policy != reference: rewards and gradients are not zero
    model.train()
    return model


@pytest.mark.slow
def test_compiled_layers_give_the_plain_numbers(untrained_tiny):
    """Losses and log-probs to 1e-5 relative, LoRA gradients to 1e-4, before and after compiling the same model in
    place; two layouts of different widths also prove a changed shape does not break the compiled layers. Rewards
    get 1e-5 absolute: each is beta times a difference of two log-probs of ~1e2, and the compiled kernels round in
    another order (~1e-5 on a log-prob). Most of the ~50 s is the compile itself."""
    model = _model(untrained_tiny["model"], checkpointing=True)
    pairs, pad_token_id = _pairs(untrained_tiny["model"], untrained_tiny["train"], max_length=64)
    dpo = DpoSection()
    batches = [collate(layout, pairs, pad_token_id) for layout in ("padded", "shared-prompt")]
    plain = [_scores_and_grads(model, batch, dpo) for batch in batches]
    assert compile_decoder_layers(model) == 2
    compiled = [_scores_and_grads(model, batch, dpo) for batch in batches]
    for (ours, grads), (theirs, their_grads) in zip(compiled, plain, strict=True):
        torch.testing.assert_close(ours.losses, theirs.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.logps.chosen, theirs.logps.chosen, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.logps.rejected, theirs.logps.rejected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.chosen_rewards, theirs.chosen_rewards, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.rejected_rewards, theirs.rejected_rewards, rtol=0, atol=1e-5)
        assert grads.keys() == their_grads.keys() and grads
        for name, grad in grads.items():
            scale = float(their_grads[name].abs().max())
            torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_a_model_without_decoder_layers_is_refused():
    class NoLayers(torch.nn.Module):
        base_model = torch.nn.Identity()

        def get_output_embeddings(self):
            return None

    with pytest.raises(UserError, match="--compile: Identity keeps no decoder layers"):
        compile_decoder_layers(NoLayers())
