"""An adapter folder someone handed you, with a hostile recipe.yaml: eval ends in one line, in bounded time."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import run_cli_inprocess
from tests.test_config import _alias_bomb


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_alias_bomb(7), "recipe.yaml:6: expands to more than 10,000 values"),
        ("training: [1, 2]\n", "recipe.yaml: recipe section 'training' must be a mapping of keys to values, got list"),
        ("dpo: &a [x]\nlora: *a\n", "recipe.yaml: recipe section 'dpo' must be a mapping"),
        ("dpo: a string\n", "recipe.yaml: recipe section 'dpo' must be a mapping of keys to values, got str"),
    ],
    ids=["alias-bomb", "list", "anchor-list", "string"],
)
def test_eval_of_an_adapter_with_a_hostile_recipe_is_one_line(
    tiny_adapter, tiny_demo, tmp_path, capsys, recipe, message
):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "recipe.yaml").write_text(recipe)
    start = time.perf_counter()
    code, stdout, stderr = run_cli_inprocess(capsys, "eval", "--adapter", adapter, "--data", tiny_demo["test"])
    assert code == 2 and len(stderr.splitlines()) == 1 and message in stderr, stderr[:500]
    assert len(stderr) < 400 and time.perf_counter() - start < 30
