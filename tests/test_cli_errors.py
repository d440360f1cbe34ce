"""Usage errors and bad values end in exit 2 and a short message, never a traceback, whatever typer parses with.

Usage errors (mistyped commands and options, missing arguments, unparsable values) get click's usage message; bad
values (inf, nan, an unknown device, a zero or negative count) get one `error:` line naming the recipe key. All of
them fail before a model is loaded or a file is written.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import typer

from dpo_cli.config import DataSection, DpoSection, LoraSection, ModelSection, Recipe, TrainingSection, recipe_from_dict
from dpo_cli.errors import UserError
from tests.conftest import run_cli_inprocess, run_cli_subprocess

USAGE_ERRORS = {
    "mistyped command": (["trian"], "No such command 'trian'"),
    "mistyped subcommand": (["data", "chek", "x.jsonl"], "No such command 'chek'"),
    "mistyped option": (["train", "--max-stpes", "3"], "No such option: --max-stpes"),
    "not an integer": (["train", "--max-steps", "abc"], "Invalid value for '--max-steps'"),
    "not a number": (["train", "--epochs", "many"], "Invalid value for '--epochs'"),
    "option without its value": (["merge-adapter", "--adapter"], "Option '--adapter' requires an argument"),
    "missing option": (["eval", "--adapter", "some-adapter"], "Missing option '--data'"),
    "missing argument": (["data", "check"], "Missing argument 'files'"),
    "extra argument": (["train", "a.yaml", "b.yaml"], "Got unexpected extra argument"),
}


@pytest.mark.parametrize("args, message", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_exit_2_with_the_usage_line(capsys, args, message):
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2
    # click prints the usage line when it knows the command; an option missing its value comes before that.
    assert stderr.startswith(("Usage: dpo-cli ", f"Error: {message}"))
    assert f"Error: {message}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("parser", ["click", "typer's vendored click"])
def test_usage_errors_of_either_click_are_handled(capsys, monkeypatch, parser):
    """typer before 0.29 raised click's own exceptions, 0.29 raises its vendored copy's; main() handles both."""
    import click

    import dpo_cli.cli

    usage_error = click.UsageError if parser == "click" else typer.BadParameter.__mro__[1]
    assert usage_error.__name__ == "UsageError"

    def parse_and_fail(**_):
        raise usage_error("no such thing")

    monkeypatch.setattr(dpo_cli.cli, "app", parse_and_fail)
    code, _, stderr = run_cli_inprocess(capsys, "anything")
    assert (code, stderr) == (2, "Error: no such thing\n")


@pytest.mark.parametrize("args", [[], ["data"]], ids=["no arguments", "group without its command"])
def test_no_command_shows_the_help_and_exits_2(capsys, args):
    code, stdout, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2
    assert "Usage: dpo-cli" in stdout + stderr
    assert "Traceback" not in stderr


def test_help_still_exits_0(capsys):
    code, stdout, _ = run_cli_inprocess(capsys, "train", "--help")
    assert code == 0
    assert "--max-steps" in stdout


def test_usage_error_in_a_real_process_has_no_traceback():
    """The in-process runner catches what escapes main(); a real process shows what a user's terminal would."""
    result = run_cli_subprocess("train", "--max-steps", "abc", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Usage: dpo-cli train" in result.stderr
    assert "Invalid value for '--max-steps'" in result.stderr


BAD_VALUES = {
    "--epochs inf": (["--epochs", "inf"], "training.epochs: inf is not a finite number"),
    "--epochs nan": (["--epochs", "nan"], "training.epochs: nan is not a finite number"),
    "--lr inf": (["--lr", "inf"], "training.lr: inf is not a finite number"),
    "--beta nan": (["--beta", "nan"], "dpo.beta: nan is not a finite number"),
    "--eval-split nan": (["--eval-split", "nan"], "data.eval_split: nan is not a finite number"),
    "yaml nan": (["--set", "training.lr=.nan"], "training.lr: nan is not a finite number"),
    "yaml -inf": (["--set", "training.warmup_ratio=-.inf"], "training.warmup_ratio: -inf is not a finite number"),
    "overflowing float": (["--set", "training.lr=1e999"], "training.lr: inf is not a finite number"),
    "nan in a list": (["--set", "dpo.loss_weights=[.nan]"], "dpo.loss_weights: nan is not a finite number"),
    "unknown device": (["--set", "model.device=tpu"], "model.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    "malformed cuda device": (["--set", "model.device=cuda:x"], "model.device: 'cuda:x' is not one of"),
    "zero batch": (["--batch-size", "0"], "training.batch_size: 0 must be positive"),
    "zero length": (["--max-length", "0"], "data.max_length: 0 must be positive"),
    "negative steps": (["--max-steps", "-1"], "training.max_steps: -1 is negative"),
    "negative epochs": (["--max-steps", "5", "--epochs", "-1"], "training.epochs: -1.0 is negative"),
    "zero lr": (["--lr", "0"], "training.lr: 0.0 must be positive"),
    "negative seed": (["--seed", "-1"], "training.seed: -1 is outside [0, 2**63)"),
    "zero clip norm": (["--set", "training.max_grad_norm=0"], "training.max_grad_norm: 0.0 must be positive"),
    "negative weight decay": (["--set", "training.weight_decay=-0.1"], "training.weight_decay: -0.1 is negative"),
}


@pytest.mark.parametrize("flags, message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_one_line_and_exit_2(capsys, tmp_path, flags, message):
    output = tmp_path / "run"
    args = ["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl")]
    code, _, stderr = run_cli_inprocess(capsys, *args, "--output-dir", str(output), *flags)
    assert code == 2
    assert stderr.startswith("error: recipe key ") and stderr.count("\n") == 1  # one line ...
    assert message in stderr  # ... naming the key and the value
    assert not output.exists()  # refused before anything was written


def test_bad_value_in_a_real_process_is_one_line():
    result = run_cli_subprocess("train", "--epochs", "inf", timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: recipe key training.epochs: inf is not a finite number; e.g. 1.0\n"


def test_data_check_refuses_a_zero_max_length(capsys, tmp_path):
    code, _, stderr = run_cli_inprocess(capsys, "data", "check", str(tmp_path / "x.jsonl"), "--max-length", "0")
    assert (code, stderr) == (2, "error: recipe key data.max_length: 0 must be positive\n")


SECTIONS = {
    "model": ModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "training": TrainingSection,
    "dpo": DpoSection,
}


def _float_settings() -> list[tuple[str, str, typing.Any]]:
    """(section, key, annotation) of every setting that holds floats: float, float | None, list[float] | None."""
    found = []
    for section, cls in SECTIONS.items():
        for name, annotation in typing.get_type_hints(cls).items():
            if "float" in str(annotation):
                found.append((section, name, annotation))
    return found


def test_float_settings_are_found():
    keys = {f"{section}.{key}" for section, key, _ in _float_settings()}
    assert {"training.lr", "training.epochs", "dpo.beta", "dpo.loss_weights", "lora.dropout"} <= keys


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("section, key, annotation", _float_settings(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_float_setting_refuses_non_finite_values(section, key, annotation, bad):
    value = [bad] if "list" in str(annotation) else bad
    with pytest.raises(UserError, match=rf"recipe key {section}\.{key}: .* is not a finite number"):
        recipe_from_dict({section: {key: value}})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_known_devices_are_accepted(device):
    assert recipe_from_dict({"model": {"device": device}}).model.device == device


@pytest.mark.parametrize("device", ["tpu", "CPU", "cuda:", "cuda:-1", "cuda:0 ", "", "mps"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(UserError, match=r"recipe key model\.device: .* is not one of auto, cpu, cuda, cuda:N"):
        recipe_from_dict({"model": {"device": device}})


def test_a_cuda_index_past_the_visible_gpus_is_one_line(monkeypatch):
    import torch

    from dpo_cli.model.load import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"'cuda:2' but 2 CUDA GPU\(s\) are visible; use cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_defaults_pass_every_new_check():
    assert dataclasses.asdict(Recipe()) == dataclasses.asdict(recipe_from_dict({}))


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--adapter", "some-adapter", "--data", "pairs.jsonl"],
        ["merge-adapter", "--adapter", "some-adapter", "--output", "merged"],
    ],
    ids=["eval", "merge-adapter"],
)
def test_commands_other_than_train_refuse_a_launcher(capsys, monkeypatch, tmp_path, args):
    """Under torchrun every process would repeat the same eval or merge (and race for its output): one line instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2
    assert f"dpo-cli {args[0]} runs as one process, and WORLD_SIZE=2" in stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
