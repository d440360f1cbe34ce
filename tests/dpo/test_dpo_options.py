"""The `dpo` recipe section: every loss and option parses, invalid combinations stop at load with one line naming
the key, and `precompute_ref` trains exactly as the live reference does while skipping its pass in every step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dpo_cli.config import DpoSection, load_recipe, recipe_from_dict
from dpo_cli.dpo.losses import LOSS_TYPES
from dpo_cli.errors import UserError
from tests.conftest import REPO

NEEDS_SMOOTHING = {"exo_pair": 1e-3}


@pytest.mark.parametrize("loss", sorted(LOSS_TYPES))
def test_each_loss_parses_by_its_trl_name(loss):
    dpo = recipe_from_dict({"dpo": {"loss_type": loss, "label_smoothing": NEEDS_SMOOTHING.get(loss, 0.0)}}).dpo
    assert dpo.loss_type == [loss]


def test_a_full_recipe_section_parses_with_yaml_types():
    dpo = recipe_from_dict(
        {
            "dpo": {
                "loss_type": ["sigmoid", "hinge", "sft"],
                "loss_weights": [0.8, 0.2, 1],  # an int weight is read as a float
                "beta": 0.05,
                "ld_alpha": 0.5,
                "use_weighting": False,
                "f_divergence_type": "js_divergence",
                "precompute_ref": True,
            }
        }
    ).dpo
    assert dpo.loss_weights == [0.8, 0.2, 1.0] and dpo.ld_alpha == 0.5 and dpo.precompute_ref == "true"
    simpo = recipe_from_dict({"dpo": {"reference_free": True, "beta": 2.0, "gamma": 1.0}}).dpo
    assert simpo.reference_free and simpo.gamma == 1.0
    smoothed = DpoSection(loss_type=["aot_unpaired"], label_smoothing=0.3, f_divergence_type="reverse_kl")
    assert smoothed.label_smoothing == 0.3
    alpha = DpoSection(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert alpha.f_alpha_divergence_coef == 0.3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"loss_type": ["robust"], "label_smoothing": 0.5},
            r"dpo\.label_smoothing: 0\.5 must be below 0\.5 for robust",
        ),
        ({"loss_type": ["sigmoid"], "label_smoothing": 0.7}, r"dpo\.label_smoothing: 0\.7 must be below 0\.5"),
        ({"loss_type": ["exo_pair"]}, r"dpo\.label_smoothing: exo_pair needs it above 0"),
        ({"loss_type": ["exo_pair"], "label_smoothing": 1.0}, r"dpo\.label_smoothing: 1\.0 is outside \[0, 1\)"),
        ({"loss_type": ["hinge"], "label_smoothing": 0.1}, r"dpo\.label_smoothing: 0\.1 has no effect on \['hinge'\]"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"dpo\.loss_weights: 1 weights for 2 losses"),
        ({"loss_type": ["dpo"]}, r"dpo\.loss_type: 'dpo' is not one of sigmoid, hinge"),
        ({"loss_type": []}, r"dpo\.loss_type: empty"),
        ({"loss_type": ["bco_pair"], "f_divergence_type": "forward_kl"}, r"dpo\.f_divergence_type: .* for bco_pair"),
        ({"loss_type": ["sigmoid", "apo_zero"], "f_divergence_type": "js_divergence"}, r"no valid form for apo_zero"),
        ({"f_divergence_type": "kl"}, r"dpo\.f_divergence_type: 'kl' is not one of reverse_kl"),
        ({"f_alpha_divergence_coef": 0.3}, r"dpo\.f_alpha_divergence_coef: read only with .*alpha_divergence"),
        ({"loss_type": ["aot"], "use_weighting": True}, r"dpo\.use_weighting: .*aot and aot_unpaired sort"),
        ({"loss_type": ["sigmoid", "sft"], "use_weighting": True}, r"dpo\.use_weighting: sft is one number"),
        ({"ld_alpha": 1.5}, r"dpo\.ld_alpha: 1\.5 is outside \[0, 1\]"),
        ({"discopop_tau": 0.1}, r"dpo\.discopop_tau: read only by loss_type discopop"),
        ({"loss_type": ["discopop"], "discopop_tau": 0.0}, r"dpo\.discopop_tau: 0\.0 must be positive"),
        ({"beta": 0.0}, r"dpo\.beta: 0\.0 must be positive"),
        ({"gamma": 1.0}, r"dpo\.gamma: SimPO's margin is read only with dpo\.reference_free"),
        (
            {"reference_free": True, "loss_type": ["ipo"]},
            r"dpo\.reference_free: runs SimPO.*\['ipo'\] needs a reference",
        ),
        ({"reference_free": True, "loss_type": ["sft"]}, r"dpo\.reference_free: runs SimPO"),
        ({"reference_free": True, "precompute_ref": True}, r"dpo\.reference_free: .*precompute_ref=true"),
        ({"reference_free": True, "ld_alpha": 0.5}, r"dpo\.reference_free: .*ld_alpha=0\.5"),
        ({"reference_free": True, "use_weighting": True}, r"dpo\.reference_free: .*use_weighting=True"),
        # SimPO is its own loss: it reads no label_smoothing, which sigmoid (its recipe name) does.
        (
            {"reference_free": True, "label_smoothing": 0.1},
            r"dpo\.label_smoothing: 0\.1 has no effect on \['simpo'\]",
        ),
    ],
)
def test_invalid_combinations_fail_at_load_with_one_line_naming_the_key(settings, message):
    with pytest.raises(UserError, match=message) as error:
        load_recipe(None, {"dpo": settings})
    assert "\n" not in str(error.value) and str(error.value).startswith("recipe key dpo.")


def test_a_set_override_is_checked_with_the_file(tmp_path):
    """Switching loss_type from the command line re-checks the options the recipe file already holds."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dpo:\n  loss_type: robust\n  label_smoothing: 0.1\n")
    assert load_recipe(recipe).dpo.loss_type == ["robust"]
    with pytest.raises(UserError, match=r"label_smoothing: 0\.1 has no effect on \['ipo'\]"):
        load_recipe(recipe, {"dpo": {"loss_type": ["ipo"]}})


# precompute_ref in the training loop -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A tiny model folder and 10 preference pairs, written once."""
    from tests.conftest import write_tiny_model_and_pairs

    return write_tiny_model_and_pairs(tmp_path_factory.mktemp("precompute"))


def _train(model_dir, data, output_dir, monkeypatch, **dpo):
    """(per-step records, reference passes made during the steps) of a 3-step run on the 4-bit tiny model."""
    from rich.console import Console

    from dpo_cli.dpo import scoring as objective
    from dpo_cli.run.loop import train_step
    from dpo_cli.run.setup import build_run

    recipe = recipe_from_dict(
        {
            "model": {"path": str(model_dir), "gradient_checkpointing": False},
            "data": {"train": [str(data)]},
            "training": {
                "output_dir": str(output_dir),
                "max_steps": 3,
                "batch_size": 4,
                "eval_batch_size": 3,  # the precompute batches differ from the training batches
                "lr": 1e-2,
                "save_steps": 0,
            },
            "dpo": {"beta": 0.5, **dpo},
        }
    )
    run = build_run(recipe, console=Console(quiet=True))
    passes = []
    live_reference = objective.reference_logps
    monkeypatch.setattr(objective, "reference_logps", lambda *a: passes.append(1) or live_reference(*a))
    records = [train_step(run) for _ in range(3)]
    monkeypatch.setattr(objective, "reference_logps", live_reference)
    return records, len(passes), run


def test_precompute_ref_trains_like_the_live_reference_without_its_pass(tiny_run_inputs, tmp_path, monkeypatch):
    """With LD-DPO on, so the stored values must be the LD-weighted ones the live pass would give."""
    ld_alpha = 0.5
    model_dir, data = tiny_run_inputs
    live, live_passes, _ = _train(
        model_dir, data, tmp_path / "live", monkeypatch, ld_alpha=ld_alpha, precompute_ref="false"
    )
    pre, pre_passes, run = _train(
        model_dir, data, tmp_path / "pre", monkeypatch, ld_alpha=ld_alpha, precompute_ref=True
    )
    assert live_passes == 3 and pre_passes == 0
    assert run.train_ref_logps.shape == (10, 2)
    for step_live, step_pre in zip(live, pre, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            assert step_pre[key] == pytest.approx(step_live[key], rel=1e-5, abs=1e-7), key
    assert live[-1]["loss"] < live[0]["loss"], "the run learns, so later steps test a moved policy"
    assert torch.isfinite(run.train_ref_logps).all()


def test_the_readme_tables_every_loss_and_option():

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Losses", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| `")}
    assert {f"`{name}`" for name in LOSS_TYPES} <= {row.split(" ")[0] for row in rows}
    options = {f.name for f in dataclasses.fields(DpoSection)} - {"beta", "loss_type", "loss_weights"}
    options -= {"label_smoothing", "discopop_tau"}  # the loss table's hyperparameter column covers these
    assert all(f"`{option}`" in section for option in options), sorted(o for o in options if f"`{o}`" not in section)
