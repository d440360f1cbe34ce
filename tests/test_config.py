"""Recipes: typed, strict about unknown keys, overridable from the command line; every shipped recipe parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_cli.config import Recipe, load_recipe, merge_overrides, parse_set_option, read_recipe_file, recipe_from_dict
from dpo_cli.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_defaults_are_the_documented_ones():
    recipe = Recipe()
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 32, 0.0)
    assert recipe.lora.target_modules == ["all-linear"]
    assert recipe.model.quantize and recipe.model.gradient_checkpointing
    assert recipe.data.max_length == 1024
    assert recipe.dpo.loss_type == ["sigmoid"]


def test_misspelled_key_names_the_key_and_suggests_the_right_one():
    with pytest.raises(UserError, match=r"unknown recipe key training\.lerning_rate.*") as error:
        recipe_from_dict({"training": {"lerning_rate": 1e-4}})
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"did you mean 'batch_size'"):
        recipe_from_dict({"training": {"batch_sise": 4}})
    with pytest.raises(UserError, match=r"unknown recipe section 'trainig'.*did you mean 'training'"):
        recipe_from_dict({"trainig": {}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"training": {"batch_size": "four"}}, r"training\.batch_size: expected int, got str"),
        ({"training": {"batch_size": 0}}, r"training\.batch_size: 0 must be positive"),
        ({"model": {"quantize": "yes"}}, r"model\.quantize: expected bool"),
        ({"dpo": {"beta": -1}}, r"dpo\.beta"),
        ({"training": {"scheduler": "step"}}, r"training\.scheduler: 'step' is not one of"),
        ({"lora": {"target_modules": ["q_proj", "lm_head"]}}, r"lm_head"),
        ({"training": "fast"}, r"section 'training' must be a mapping"),
    ],
)
def test_bad_values_fail_with_the_key(values, message):
    with pytest.raises(UserError, match=message):
        recipe_from_dict(values)


def test_ints_are_accepted_for_floats_and_strings_for_lists():
    recipe = recipe_from_dict({"training": {"lr": 1}, "data": {"train": "a.jsonl"}})
    assert recipe.training.lr == 1.0 and isinstance(recipe.training.lr, float)
    assert recipe.data.train == ["a.jsonl"]


def test_set_option_reads_yaml_values():
    section, key, value = parse_set_option("training.lr=1e-5")
    assert recipe_from_dict({section: {key: value}}).training.lr == 1e-5
    assert parse_set_option("model.quantize=false") == ("model", "quantize", False)
    assert parse_set_option("lora.target_modules=[q_proj, v_proj]") == ("lora", "target_modules", ["q_proj", "v_proj"])
    with pytest.raises(UserError, match="expected section.key=value"):
        parse_set_option("lr=3")


def test_flags_override_the_file_and_unset_flags_do_not(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  lr: 0.001\n  batch_size: 2\n")
    merged = merge_overrides(read_recipe_file(path), {"training": {"lr": 0.5, "batch_size": None}})
    recipe = recipe_from_dict(merged)
    assert recipe.training.lr == 0.5 and recipe.training.batch_size == 2


def test_malformed_yaml_gives_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training:\n  lr: 0.1\n bad indent: [\n")
    with pytest.raises(UserError, match=rf"{path}:\d+"):
        load_recipe(path)
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_saved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict({"model": {"path": "m"}, "training": {"lr": 3e-4}, "lora": {"r": 8}})
    recipe.save(tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses_and_opens_with_its_command(path):
    load_recipe(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# dpo-cli train"), "each recipe opens with the exact command that runs it"


def test_recipes_are_shipped():
    assert len(RECIPES) >= 3
