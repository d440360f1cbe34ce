"""Which way the imports run: the math in dpo/ imports only torch, the standard library and dpo/ itself, and reading
a recipe imports no torch. Each check runs in a fresh interpreter, so modules other tests loaded cannot hide an
import; and no function-level import may reach into dpo_cli where it would hide a back-reference."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "dpo_cli"
DPO_MODULES = sorted(f"dpo_cli.dpo.{path.stem}" for path in (PACKAGE / "dpo").glob("*.py") if path.stem != "__init__")


def modules_after(code: str) -> list[str]:
    """The names in sys.modules after running `code` in a fresh interpreter from the repository root."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_the_math_imports_only_torch_and_itself():
    assert "dpo_cli.dpo.scoring" in DPO_MODULES and "dpo_cli.dpo.loss_specs" in DPO_MODULES
    loaded = modules_after("\n".join(f"import {name}" for name in DPO_MODULES))
    ours_outside = [name for name in loaded if name.startswith("dpo_cli.") and not name.startswith("dpo_cli.dpo")]
    assert ours_outside == []
    heavy = [name for name in loaded if name.split(".")[0] in ("transformers", "peft", "bitsandbytes", "yaml")]
    assert heavy == []
    assert "torch" in loaded  # the check sees real imports: dpo/ does use torch


def test_reading_a_recipe_imports_no_torch():
    loaded = modules_after(
        "import dpo_cli.config\n"
        "from pathlib import Path\n"
        "recipe = dpo_cli.config.load_recipe(Path('recipes/tiny-cpu.yaml'), {'dpo': {'loss_type': ['ipo']}})\n"
        "assert recipe.dpo.loss_type == ['ipo']"
    )
    assert "dpo_cli.config" in loaded and "dpo_cli.dpo.loss_specs" in loaded
    assert "torch" not in loaded


def _function_level_imports(path) -> list[str]:
    """'module:line name' for every import of a dpo_cli module inside a function of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = []
            if isinstance(inner, ast.ImportFrom) and inner.module:
                names = [inner.module]
            elif isinstance(inner, ast.Import):
                names = [alias.name for alias in inner.names]
            found += [f"{path.name}:{inner.lineno} {name}" for name in names if name.startswith("dpo_cli")]
    return found


@pytest.mark.parametrize("path", [PACKAGE / "config.py", *sorted((PACKAGE / "dpo").glob("*.py"))], ids=str)
def test_no_function_level_import_hides_a_dependency(path):
    assert _function_level_imports(path) == []


@pytest.mark.parametrize(
    ("leaf", "may_load"),
    [
        ("dpo_cli.dpo.loss_specs", set()),
        ("dpo_cli.data.formats", {"dpo_cli.errors"}),
        ("dpo_cli.data.sft_formats", {"dpo_cli.errors", "dpo_cli.data.formats"}),
    ],
)
def test_the_rule_tables_config_reads_are_leaves(leaf, may_load):
    """config imports these at its top, so they must not import config (a cycle) or anything heavy."""
    loaded = {name for name in modules_after(f"import {leaf}") if name.startswith("dpo_cli")}
    package = leaf.rsplit(".", 1)[0]
    assert loaded - {"dpo_cli", package, leaf} == may_load
    assert "torch" not in modules_after(f"import {leaf}")
