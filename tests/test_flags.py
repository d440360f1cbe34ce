"""One declaration per setting: each recipe flag is declared once, on its field, and every command builds it from there.

The walk below reads the recipe's fields and every command's click options. A recipe option must carry the name and
help its field declares; an option a command declares itself must not be a recipe setting under another name.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

from dpo_cli import cli
from dpo_cli.errors import UserError
from dpo_cli.flags import declared_flag, field_docs, flags_for, section_fields
from tests.conftest import run_cli_inprocess

RECIPE_COMMANDS = ("train", "sft", "eval", "data check", "merge-adapter")
"""The commands that read a recipe: each takes --set and the flags that apply to it."""

OWN_OPTIONS_NAMED_LIKE_A_FLAG = {
    ("eval", "--seed"): "seeds the --generate samples; training.seed does not apply to eval",
}
"""A command's own option that shares a recipe flag's name, and why it is another setting."""


def commands() -> dict[str, object]:
    """{command path: its click command}, every command of the app."""
    group = typer.main.get_command(cli.app)
    found = {}
    for name, command in group.commands.items():
        for sub_name, sub in getattr(command, "commands", {}).items():
            found[f"{name} {sub_name}"] = sub
        if not hasattr(command, "commands"):
            found[name] = command
    return found


def fields() -> dict[str, tuple[type, dataclasses.Field]]:
    return {f"{name}.{item.name}": (cls, item) for name, (cls, items) in section_fields().items() for item in items}


def recipe_keys_of(command) -> dict[str, str]:
    """{option's parameter name: recipe key} of the options a command built from the recipe."""
    return {flag.parameter: flag.key for flag in getattr(command.callback, "recipe_flags", [])}


def option_names(command) -> list[str]:
    return [name for param in command.params for name in param.opts + param.secondary_opts if name.startswith("-")]


def test_the_commands_that_read_a_recipe_are_all_there():
    assert set(RECIPE_COMMANDS) <= set(commands())


@pytest.mark.parametrize("path", RECIPE_COMMANDS)
def test_each_recipe_option_is_its_fields_declaration(path):
    command = commands()[path]
    keys = recipe_keys_of(command)
    assert keys, f"{path} builds no option from the recipe"
    for param in command.params:
        if param.name not in keys:
            continue
        cls, item = fields()[keys[param.name]]
        names = param.opts + param.secondary_opts  # a bool pair's --no- half is its secondary option
        assert names == declared_flag(item, path).split("/"), names  # the names the field declares, nothing else
        assert param.help.startswith(field_docs(cls)[item.name][:40].replace("[", "\\[")), param.help


@pytest.mark.parametrize("path", RECIPE_COMMANDS)
def test_no_command_declares_a_recipe_flag_of_its_own(path):
    command = commands()[path]
    keys = recipe_keys_of(command)
    declared = {declared_flag(item, path) for _, item in fields().values()} - {None}
    recipe_flags = {name for flag in declared for name in flag.split("/")}
    for param in command.params:
        if param.name in keys or param.param_type_name != "option":
            continue
        for name in param.opts:
            if name in recipe_flags:
                assert (path, name) in OWN_OPTIONS_NAMED_LIKE_A_FLAG, f"{path} {name}: declare it on the recipe field"
                taken = [key for key in keys.values() if name in declared_flag(fields()[key][1], path).split("/")]
                assert not taken, f"{path} {name}: also the flag of {taken}"
    assert "--set" in option_names(command)
    names = option_names(command)
    assert len(names) == len(set(names)), f"{path}: an option name twice"


def test_every_flag_is_declared_once_and_documented():
    for path in RECIPE_COMMANDS:
        keys = [key for key, (_, item) in fields().items() if declared_flag(item, path)]
        flags_for(path, keys)  # raises on a flagged field without a docstring
    train_flags = [declared_flag(item, "train") for _, item in fields().values()]
    named = [flag for flag in train_flags if flag]
    assert len(named) == len(set(named)), "two recipe fields declare the same flag"


@pytest.mark.parametrize(("path", "other_objective"), [("train", "sft"), ("sft", "dpo")])
def test_train_and_sft_take_every_flagged_field_but_the_other_objectives(path, other_objective):
    from dpo_cli.cli import SFT_LEAVES_OUT

    flagged = {key for key, (_, item) in fields().items() if declared_flag(item, path)}
    ours = {key for key in flagged if not key.startswith(f"{other_objective}.")}
    if path == "sft":
        ours -= set(SFT_LEAVES_OUT)
    assert ours != flagged, f"the {other_objective} section has flags, which {path} leaves out"
    assert set(recipe_keys_of(commands()[path]).values()) == ours


@pytest.fixture
def captured_overrides(monkeypatch):
    """Stop train where it loads the recipe and keep what the flags made of it."""
    import dpo_cli.config

    seen = {}

    def load_recipe(path, overrides):
        seen.update(overrides)
        raise UserError("stopped by the test")

    monkeypatch.setattr(dpo_cli.config, "load_recipe", load_recipe)
    return seen


def test_flags_reach_the_recipe_keys_they_declare(capsys, captured_overrides):
    code, _, stderr = run_cli_inprocess(
        capsys, "train", "--data", "a.jsonl", "--data", "b.jsonl", "--no-quantize", "--no-gradient-checkpointing",
        "--format", "hh-rlhf",
        "--columns", "prompt=question", "--lr", "1e-4", "--report-to", "tensorboard", "--set", "lora.r=8",
        "--set", "training.lr=0.0002",
    )  # fmt: skip
    assert (code, stderr) == (2, "error: stopped by the test\n")
    assert captured_overrides == {
        "data": {"train": ["a.jsonl", "b.jsonl"], "format": "hh-rlhf", "columns": "prompt=question"},
        "model": {"quantize": False, "gradient_checkpointing": False},
        "training": {"lr": 2e-4},  # --set comes after the flags
        "report": {"trackers": ["tensorboard"]},
        "lora": {"r": 8},
    }


@pytest.mark.parametrize(
    ("flag", "value"), [("--gradient-checkpointing", True), ("--no-gradient-checkpointing", False)]
)
def test_a_bool_pair_sets_either_value(capsys, captured_overrides, flag, value):
    """A recipe that turned checkpointing off can be turned back on from the command line, and the other way round."""
    code, _, _ = run_cli_inprocess(capsys, "train", flag)
    assert code == 2 and captured_overrides == {"model": {"gradient_checkpointing": value}}


def test_flags_not_given_leave_the_recipe_alone(capsys, captured_overrides):
    code, _, _ = run_cli_inprocess(capsys, "train")
    assert code == 2 and captured_overrides == {}


def test_data_check_takes_set(capsys, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    code, stdout, stderr = run_cli_inprocess(
        capsys, "data", "check", data, "--json", "--set", "data.columns=prompt=question,chosen=good,rejected=bad"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["total"]["pairs"] == 1
    code, _, stderr = run_cli_inprocess(capsys, "data", "check", data, "--set", "data.layout=sideways")
    assert code == 2 and stderr.startswith("error: recipe key data.layout: 'sideways'") and stderr.count("\n") == 1


def test_merge_adapter_takes_set_over_the_adapters_recipe(capsys, tiny_adapter, tmp_path):
    output = tmp_path / "merged"
    args = ("merge-adapter", "--adapter", tiny_adapter, "--output", output, "--set", "model.device=tpu")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert (code, stderr) == (2, "error: recipe key model.device: 'tpu' is not one of auto, cpu, cuda, cuda:N\n")
    assert not output.exists()


def test_eval_set_goes_over_the_adapters_recipe(capsys, tiny_adapter, tiny_demo):
    args = ("eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--set", "dpo.loss_type=nonsense")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2 and stderr.startswith("error: recipe key dpo.loss_type: 'nonsense'"), stderr
    assert stderr.count("\n") == 1


def test_the_format_help_names_every_format():
    from dpo_cli.config import DataSection
    from dpo_cli.data.formats import FORMAT_CHOICES

    help_text = field_docs(DataSection)["format"]
    assert all(name in help_text.replace(",", " ").split() for name in FORMAT_CHOICES), help_text
