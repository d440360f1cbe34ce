"""--reward: a function file, a module, a tiny sequence-classification model; and the one line for each mistake."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dpo_cli.errors import UserError
from dpo_cli.online.rewards import RewardFailed, load_rewards
from tests.conftest import run_cli_inprocess

REWARDS_PY = """
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def topic_bonus(prompts, completions, topic=None, **columns):
    # a column of the prompt file arrives as a keyword, one value per completion (TRL's contract)
    return [1.0 if t and t in c else 0.0 for c, t in zip(completions, topic or [None] * len(completions))]

def no_opinion(prompts, completions, **columns):
    return [None if "?" in c else 1.0 for c in completions]

def raising(prompts, completions, **columns):
    return _deep_helper(completions)

def _deep_helper(completions):
    raise ZeroDivisionError("user bug on purpose")

def too_few(prompts, completions, **columns):
    return [0.0]

def with_nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)

def with_text(prompts, completions, **columns):
    return ["high"] * len(completions)

not_a_function = 3
"""


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def score(rewards, completions, columns=None, prompt="P"):
    return rewards.score([prompt] * len(completions), completions, columns or {}, "prompts.jsonl:1")


def test_a_function_file_with_weights_and_columns(rewards_file):
    rewards = load_rewards([f"{rewards_file}:length", f"{rewards_file}:topic_bonus"], [0.5, 10.0])
    combined, each = score(rewards, ["ab", "cats!"], {"topic": ["cat", "cat"]})
    assert combined == [0.5 * 2 + 0.0, 0.5 * 5 + 10.0]
    assert each[1] == {f"{rewards_file}:length": 5.0, f"{rewards_file}:topic_bonus": 1.0}


def test_none_means_no_opinion_for_the_combined_reward(rewards_file):
    rewards = load_rewards([f"{rewards_file}:length", f"{rewards_file}:no_opinion"])
    combined, _ = score(rewards, ["why?", "yes"])
    assert combined == [None, 4.0]


def test_a_package_module_function(tmp_path, monkeypatch):
    package = tmp_path / "scorers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "happy.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = load_rewards(["scorers.happy:score"])
    assert score(rewards, ["a", "b"])[0] == [1.0, 1.0]
    sys.modules.pop("scorers.happy", None)
    sys.modules.pop("scorers", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{file}:missing", "has no function 'missing'"),
        ("{file}:not_a_function", "is not a function"),
        ("{dir}/nothere.py:f", "not found"),
        ("no_such_package_xyz.mod:f", "no module named 'no_such_package_xyz'"),
        ("just-a-word", "not FILE.py:FUNC"),
    ],
)
def test_a_wrong_spec_is_one_line(rewards_file, spec, message):
    with pytest.raises(UserError, match=message):
        load_rewards([spec.format(file=rewards_file, dir=rewards_file.parent)])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("too_few", "returned 1 values for 2 completions on prompts.jsonl:1"),
        ("with_nan", "returned nan for completion 0 on prompts.jsonl:1; rewards must be finite"),
        ("with_text", "returned str 'high' for completion 0"),
    ],
)
def test_a_wrong_return_is_one_line(rewards_file, name, message):
    rewards = load_rewards([f"{rewards_file}:{name}"])
    with pytest.raises(UserError, match=message):
        score(rewards, ["a", "b"])


def test_a_raising_reward_carries_its_own_traceback(rewards_file):
    rewards = load_rewards([f"{rewards_file}:raising"])
    with pytest.raises(RewardFailed) as caught:
        score(rewards, ["a", "b"])
    assert "raised ZeroDivisionError on the prompt of prompts.jsonl:1" in str(caught.value)
    details = caught.value.details
    assert "_deep_helper" in details and "user bug on purpose" in details and str(rewards_file) in details
    assert "rewards.py" not in details.replace(str(rewards_file), "")  # our frames are left out


def test_wrong_number_of_weights(rewards_file):
    with pytest.raises(UserError, match="2 weights for 1 rewards"):
        load_rewards([f"{rewards_file}:length"], [1.0, 2.0])


# A reward model ------------------------------------------------------------------------------------------------


@pytest.fixture
def reward_model(untrained_tiny, tmp_path):
    """A tiny LlamaForSequenceClassification with one label, and the demo tokenizer, saved in tmp_path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny["model"])
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def test_a_reward_model_scores_like_its_own_forward(reward_model):
    folder, model, tokenizer = reward_model
    rewards = load_rewards([str(folder)], batch_size=2, device="cpu")
    prompts = ["One day Tom went to the park.", "At the lake, Mia", "Sue walked."]
    completions = [" He was happy.", " cried and cried all day long.", " Sunny!"]
    combined, _ = rewards.score(prompts, completions, {}, "p:1")
    with torch.no_grad():
        expected = [
            model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert combined == pytest.approx(expected, abs=1e-5)  # batched and padded, the same as one at a time


def test_a_model_of_another_kind_is_one_line(reward_model, untrained_tiny, tmp_path):
    with pytest.raises(UserError, match="LlamaForCausalLM, not a sequence-classification reward model"):
        load_rewards([str(untrained_tiny["model"])])
    folder, _, _ = reward_model
    config = json.loads((folder / "config.json").read_text())
    two = tmp_path / "two-labels"
    two.mkdir()
    config["id2label"], config["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="the model has 2 labels; a reward model has one"):
        load_rewards([str(two)])
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling.RM"}
    config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="pass --trust-remote-code"):
        load_rewards([str(two)])


# Through the command line ------------------------------------------------------------------------------------


def test_sample_prints_our_line_then_the_users_traceback(capsys, untrained_tiny, rewards_file, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "One day Tom went to the park."}) + "\n")
    code, _, err = run_cli_inprocess(
        capsys,
        "sample",
        "--model",
        untrained_tiny["model"],
        "--prompts",
        prompts,
        "--num-samples",
        "2",
        "--reward",
        f"{rewards_file}:raising",
        "--output-dir",
        tmp_path / "out",
        "--max-new-tokens",
        "4",
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: reward {rewards_file}:raising raised ZeroDivisionError on the prompt of ")
    assert lines[1] == "Traceback (most recent call last):"
    assert "_deep_helper" in err and lines[-1] == "ZeroDivisionError: user bug on purpose"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pairing", "best-worst"], "error: --pairing best-worst: unknown; use one of max-min, max-random, all"),
        (["--reward", "{file}:missing"], "has no function 'missing'"),
    ],
)
def test_sample_bad_input_is_one_line(capsys, untrained_tiny, rewards_file, tmp_path, args, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "One day"}) + "\n")
    args = [arg.format(file=rewards_file) for arg in args]
    reward = [] if "--reward" in args else ["--reward", f"{rewards_file}:length"]
    code, _, err = run_cli_inprocess(
        capsys,
        "sample",
        "--model",
        untrained_tiny["model"],
        "--prompts",
        prompts,
        *reward,
        *args,
        "--output-dir",
        tmp_path / "out",
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
