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


def _tiny_run(untrained_tiny, output_dir, steps=2):
    from rich.console import Console

    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": str(untrained_tiny["model"]), "gradient_checkpointing": False},
            "data": {"train": [str(untrained_tiny["train"])]},
            "training": {"output_dir": str(output_dir), "max_steps": steps, "batch_size": 4, "save_steps": 0},
        }
    )
    return build_run(recipe, console=Console(quiet=True))


def _noting(name: str, calls: list):
    """A callback that notes (its name, the hook, the run's step then) at every hook."""
    from dpo_cli.run.callbacks import Callback

    class Noting(Callback):
        def on_loop_start(self, run):
            calls.append((name, "loop_start", run.state.step))

        def on_step_begin(self, run):
            calls.append((name, "step_begin", run.state.step))

        def on_step_end(self, run, record):
            calls.append((name, "step_end", record["step"]))

        def on_interrupt(self, run):
            calls.append((name, "interrupt", run.state.step))

        def on_loop_end(self, run, result):
            calls.append((name, "loop_end", run.state.step))

        def on_end(self, run, result):
            calls.append((name, "end", run.state.step))

        def close(self, run):
            calls.append((name, "close", run.state.step))

    return Noting()


def test_fit_calls_each_hook_in_list_order_and_returns_the_records(untrained_tiny, tmp_path):
    from dpo_cli.run.loop import fit

    run, calls = _tiny_run(untrained_tiny, tmp_path / "run"), []
    try:
        result = fit(run, [_noting("a", calls), _noting("b", calls)])
    finally:
        run.metrics_log.close()
    expected = []
    for hook, step in [("loop_start", 0), ("step_begin", 0), ("step_end", 1), ("step_begin", 1), ("step_end", 2)]:
        expected += [("a", hook, step), ("b", hook, step)]
    for hook in ("loop_end", "close", "end"):  # the live display goes before the final saves
        expected += [("a", hook, 2), ("b", hook, 2)]
    assert calls == expected
    assert result.steps == 2 and [r["step"] for r in result.records] == [1, 2]
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "without the metrics callback nothing is logged"


def test_fit_closes_the_callbacks_whatever_stops_it(untrained_tiny, tmp_path):
    from dpo_cli.errors import UserError
    from dpo_cli.run.callbacks import Callback
    from dpo_cli.run.loop import TrainingInterrupted, fit

    class StopAfterStep1(Callback):
        def __init__(self, error):
            self.error = error

        def on_step_end(self, run, record):
            raise self.error

    for error, caught in ((UserError("bad"), UserError), (KeyboardInterrupt(), TrainingInterrupted)):
        run, calls = _tiny_run(untrained_tiny, tmp_path / type(error).__name__), []
        try:
            with pytest.raises(caught) as raised:
                fit(run, [StopAfterStep1(error), _noting("a", calls)])
        finally:
            run.metrics_log.close()
        interrupted = [("a", "interrupt", 1)] if caught is TrainingInterrupted else []
        assert calls == [("a", "loop_start", 0), ("a", "step_begin", 0), *interrupted, ("a", "close", 1)]
        if caught is TrainingInterrupted:
            assert raised.value.exit_code == 130 and "interrupted at step 1" in str(raised.value)
