"""The sampling and pairing options are declared once (online/sampling_options.py) and both commands take them."""

from __future__ import annotations

import dataclasses

from dpo_cli.online.sampling_options import SamplingOptions, sampling_flag
from tests.conftest import run_cli_inprocess


def _flags(command_name: str) -> set[str]:
    from typer.main import get_command

    from dpo_cli.cli import app

    command = get_command(app).commands[command_name]
    return {name for parameter in command.params for name in parameter.opts}


def test_sample_and_iterate_take_every_sampling_option():
    sample, iterate = _flags("sample"), _flags("iterate")
    for field in dataclasses.fields(SamplingOptions):
        assert sampling_flag(field, "sample") in sample, field.name
        assert sampling_flag(field, "iterate") in iterate, field.name
    # iterate's --batch-size is training's (pairs per micro-batch); its sampling batch goes by another name
    assert sampling_flag(dataclasses.fields(SamplingOptions)[5], "iterate") == "--sample-batch-size"


def test_a_bad_sampling_option_of_iterate_is_one_line_before_anything_loads(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once"}\n')
    args = ("--prompts", prompts, "--reward", "no_such_module:f", "--output-dir", tmp_path / "out")
    code, _, err = run_cli_inprocess(capsys, "iterate", *args, "--rounds", 1, "--pairing", "best")
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip() == "error: --pairing best: unknown; use one of max-min, max-random, all"
