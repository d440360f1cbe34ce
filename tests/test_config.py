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


# Hostile recipes: bounded cost, one line ------------------------------------------------------------------------


def _alias_bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs": each anchor a list of `width` aliases of the one before, `levels` deep, under model.path.
    Seven levels of nine are 423 bytes that expand to 4.8 million strings."""
    anchors = ["  a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    anchors += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "anchors:\n" + "\n".join(anchors) + f"\nmodel:\n  path: *a{levels}\n"


def _peak_bytes(function) -> tuple[int, float]:
    """(peak bytes allocated by Python, seconds) while `function` runs."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        function()
    finally:
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, seconds


@pytest.mark.parametrize("levels", [7, 8])
def test_an_alias_bomb_is_refused_while_loading_in_bounded_memory_and_time(tmp_path, levels):
    """On main, 7 levels cost 2.26 GB and 690 MB of stderr (the error line held the expanded value's repr)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(_alias_bomb(levels))
    errors = []

    def load():
        with pytest.raises(UserError) as error:
            load_recipe(path)
        errors.append(str(error.value))

    peak, seconds = _peak_bytes(load)
    assert peak < 20e6 and seconds < 5, (peak, seconds)
    assert errors[0].startswith(f"{path}:") and "expands to more than 10,000 values" in errors[0]


def test_a_large_value_is_shown_cut_short_in_the_error_line(tmp_path):
    """Under the expansion bound (a list of 729 lists of 9 strings under model.path) the value reaches the type
    check, whose line shows the value's start only."""
    path = tmp_path / "recipe.yaml"
    lol = "[" + ", ".join(['"lol"'] * 9) + "]"
    path.write_text(f"model:\n  path: [&a {lol}, &b [{', '.join(['*a'] * 9)}], [{', '.join(['*b'] * 81)}]]\n")
    with pytest.raises(UserError, match=r"recipe key model\.path: expected str, got list \[\[") as error:
        load_recipe(path)
    assert len(str(error.value)) < 300


def test_a_self_referring_alias_and_deep_nesting_are_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    for text, message in [
        ("model:\n  path: &x [*x]\n", r":2: an alias refers to a value that holds it"),
        ("model:\n  path: " + "[" * 5000 + "\n", "nested too deeply to be a recipe"),
        (f"training:\n  seed: {'7' * 5000}\n", r":2: cannot read this value \('Exceeds the limit"),
        ("training:\n  seed: 2001-13-45\n", r":2: cannot read this value"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=message) as error:
            load_recipe(path)
        assert "\n" not in str(error.value) and len(str(error.value)) < 300


@pytest.mark.parametrize(
    "section",
    ["[1, 2]", '"a string"', "7", "true", "[]", "&a [x]\nlora: *a", "\n  - 1\n  - 2"],
    ids=["list", "string", "int", "bool", "empty-list", "anchor-list", "block-list"],
)
def test_a_section_that_is_not_a_mapping_is_one_line_naming_it(tmp_path, section):
    """On main `training: [1, 2]` raised TypeError in merge_overrides, a string or an anchor list ValueError."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"training: {section}\n")
    with pytest.raises(UserError, match=rf"{path}: recipe section '(training|lora)' must be a mapping") as error:
        load_recipe(path, {"training": {"lr": 0.1}})
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="recipe section 'training' must be a mapping"):
        merge_overrides({"training": [1, 2]}, {"training": {"lr": 0.1}})
    with pytest.raises(UserError, match="recipe section 'training' must be a mapping"):
        recipe_from_dict({"training": [1, 2]})


def test_keys_that_are_not_names_are_one_line():
    with pytest.raises(UserError, match="unknown recipe section 1"):
        recipe_from_dict({1: {}})
    with pytest.raises(UserError, match=r"unknown recipe key training\.\(1, 2\)"):
        recipe_from_dict({"training": {(1, 2): 3}})
    with pytest.raises(UserError, match=r"training\.seed: <an integer of about 5,000 digits> is outside"):
        recipe_from_dict({"training": {"seed": 10**5000}})


def test_shown_is_bounded_whatever_the_value():
    from dpo_cli.errors import shown

    nested: list = ["x" * 10**6]
    for _ in range(30):
        nested = [nested] * 1000  # 1000**30 items if walked
    for value in (nested, "y" * 10**7, b"z" * 10**7, 10**10000, {str(i): i for i in range(10**5)}):
        text = shown(value)
        assert len(text) <= 200
    assert shown("short") == "'short'" and shown([1, 2]) == "[1, 2]"
