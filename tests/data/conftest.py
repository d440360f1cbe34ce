"""Fixtures the data tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def train_args(untrained_tiny, tmp_path):
    """`dpo-cli train` on the untrained tiny model: bad data must stop it before any model is loaded."""

    def args(data, *extra):
        model = untrained_tiny["model"]
        return ["train", "--model", model, "--data", data, "--output-dir", tmp_path / "run", "--max-steps", 1, *extra]

    return args
