"""The pieces of the loop that decide what data a step sees and at which learning rate."""

from __future__ import annotations

import math

import pytest

from dpo_cli.config import recipe_from_dict
from dpo_cli.run.setup import DataStream, lr_lambda, total_steps
from tests.conftest import run_cli_inprocess


def test_stream_visits_every_pair_once_per_epoch_in_a_seeded_order():
    stream = DataStream(num_pairs=10, batch_size=4, seed=7)
    assert stream.per_epoch == 3
    epoch0 = [i for m in range(3) for i in stream.indices(m)]
    epoch1 = [i for m in range(3, 6) for i in stream.indices(m)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1, "each epoch is shuffled anew"
    assert [len(stream.indices(m)) for m in range(3)] == [4, 4, 2]
    assert DataStream(10, 4, 7).indices(4) == stream.indices(4), "the order is a function of seed and position only"


def test_total_steps_from_epochs_or_max_steps():
    stream = DataStream(num_pairs=10, batch_size=4, seed=0)
    by_epochs = recipe_from_dict({"training": {"epochs": 2, "grad_accum": 2}})
    assert total_steps(by_epochs, stream) == math.ceil(2 * 3 / 2)
    by_steps = recipe_from_dict({"training": {"max_steps": 5, "epochs": 100}})
    assert total_steps(by_steps, stream) == 5


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_decays(kind):
    total, warmup = 20, 4
    factors = [lr_lambda(step, total, warmup, kind) for step in range(total)]
    assert factors[:warmup] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[warmup] == pytest.approx(1.0)
    if kind == "constant":
        assert factors[-1] == pytest.approx(1.0)
    else:
        assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :], strict=False))
        assert factors[-1] < 0.1


def test_no_quantize_trains_lora_on_a_plain_base(tiny_demo, tmp_path, capsys):
    out = tmp_path / "plain"
    args = ["train", "--model", tiny_demo["model"], "--data", tiny_demo["train"], "--output-dir", out]
    code, stdout, stderr = run_cli_inprocess(capsys, *args, "--max-steps", 2, "--no-quantize")
    assert code == 0, stderr
    from dpo_cli.config import load_recipe

    assert load_recipe(out / "recipe.yaml").model.quantize is False
    assert (out / "adapter_model.safetensors").is_file()
