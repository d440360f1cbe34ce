"""data/ stays below the model: it imports only config, errors, files and its own modules, and none of them late."""

from __future__ import annotations

import ast
from pathlib import Path

import dpo_cli.data

ALLOWED = ("dpo_cli.config", "dpo_cli.errors", "dpo_cli.files", "dpo_cli.data")
FORBIDDEN_THIRD_PARTY = ("torch", "transformers", "peft", "bitsandbytes", "rich")
UPWARD_AND_LATE = "import torch\n\ndef f():\n    from dpo_cli.model.load import load_tokenizer\n"


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module


def wrong_imports(source: str) -> list[str]:
    """`line: module` of each import of a package data/ must not use."""
    wrong = []
    for line, name in _imports(ast.parse(source)):
        if (name.startswith("dpo_cli") and not name.startswith(ALLOWED)) or name.split(".")[0] in FORBIDDEN_THIRD_PARTY:
            wrong.append(f"{line}: {name}")
    return wrong


def late_imports(source: str) -> list[str]:
    """`line: module` of each dpo_cli import inside a function, where it would hide which way imports run."""
    functions = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)]
    return [f"{line}: {name}" for f in functions for line, name in _imports(f) if name.startswith("dpo_cli")]


def _modules() -> list[Path]:
    return sorted(Path(dpo_cli.data.__file__).parent.rglob("*.py"))  # templates/ too


def test_the_checks_find_an_upward_and_a_late_import():
    assert wrong_imports(UPWARD_AND_LATE) == ["1: torch", "4: dpo_cli.model.load"]
    assert late_imports(UPWARD_AND_LATE) == ["4: dpo_cli.model.load"]


def test_data_imports_only_config_errors_files_and_itself():
    found = {path.name: wrong_imports(path.read_text(encoding="utf-8")) for path in _modules()}
    assert {name: wrong for name, wrong in found.items() if wrong} == {}


def test_no_data_module_imports_dpo_cli_inside_a_function():
    found = {path.name: late_imports(path.read_text(encoding="utf-8")) for path in _modules()}
    assert {name: late for name, late in found.items() if late} == {}
