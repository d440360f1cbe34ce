"""`dpo-cli sft`: its data formats, its batches against a slow reference, and the command's refusals and outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo_cli.data.formats import RecordProblem
from dpo_cli.data.sft_formats import SFT_FORMATS, detect_sft_format
from dpo_cli.dpo.layouts import collate_sft
from tests.conftest import run_cli_inprocess

# Data formats ---------------------------------------------------------------------------------------------------------


def _examples(record: dict) -> list[tuple]:
    pairs = SFT_FORMATS[detect_sft_format(record)](record)
    assert all(pair.chosen == pair.rejected for pair in pairs), "an example's rejected side repeats its completion"
    return [(pair.prompt, pair.chosen) for pair in pairs]


def test_each_sft_format_gives_prompt_and_completion():
    assert _examples({"prompt": "Hi", "completion": " there"}) == [("Hi", " there")]
    chat_prompt = [{"role": "user", "content": "Hi"}]
    chat_answer = [{"role": "assistant", "content": "Hello"}]
    assert _examples({"prompt": chat_prompt, "completion": chat_answer}) == [(chat_prompt, chat_answer)]
    assert _examples({"text": "Once upon a time"}) == [("", "Once upon a time")]
    # preferred-FT: a preference pair's chosen completion is the target, its rejected one is not read
    assert _examples({"prompt": "Q", "chosen": " good", "rejected": " bad"}) == [("Q", " good")]


def test_messages_learn_the_last_assistant_turn_in_the_context_of_the_others():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    assert _examples({"messages": messages}) == [(messages[:4], messages[4:])]


@pytest.mark.parametrize(
    ("record", "field", "detail"),
    [
        ({"prompt": "Only a prompt"}, "completion", "is missing"),
        ({"prompt": "Q", "completion": "  "}, "completion", "is empty"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "messages", "has no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages", "opens with the assistant"),
        ({"text": 3}, "text", "must be a string"),
    ],
)
def test_an_example_without_a_completion_is_a_problem_naming_the_field(record, field, detail):
    with pytest.raises(RecordProblem) as problem:
        _examples(record)
    assert problem.value.field == field and detail in problem.value.detail


# Batches against a slow reference -------------------------------------------------------------------------------------


def _reference_token_nll(model, examples, loss_on_prompt: bool) -> tuple[float, int, int]:
    """(summed NLL, trained tokens, top-1 hits) the obvious way: one sequence at a time through the model's own
    forward, full logits, labels -100 where not trained, shifted by one as TRL and transformers shift them."""
    nll, count, hits = 0.0, 0, 0
    for example in examples:
        ids = torch.tensor([list(example["prompt_ids"]) + list(example["chosen_ids"])])
        labels = ids.clone()
        if not loss_on_prompt:
            labels[0, : len(example["prompt_ids"])] = -100
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        shifted_logits, shifted_labels = logits[0, :-1], labels[0, 1:]
        trained = shifted_labels != -100
        nll += float(
            torch.nn.functional.cross_entropy(shifted_logits[trained], shifted_labels[trained], reduction="sum")
        )
        count += int(trained.sum())
        hits += int((shifted_logits[trained].argmax(-1) == shifted_labels[trained]).sum())
    return nll, count, hits


@pytest.fixture(scope="module")
def stories_plain(stories_model):
    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer

    section = ModelSection(path=str(stories_model), quantize=False, gradient_checkpointing=False)
    return load_base_model(section, torch.device("cpu")).eval(), load_tokenizer(str(stories_model))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_on_prompt", [False, True], ids=["completion", "loss-on-prompt"])
def test_sft_scores_equal_the_models_own_cross_entropy(stories_plain, stories_data, layout, loss_on_prompt):
    from datasets import Dataset

    from dpo_cli.data.records import ReadOptions, ReadResult, iter_file_pairs
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.model.load import scoring_model
    from dpo_cli.sft.objective import SftObjective

    model, tokenizer = stories_plain
    read = iter_file_pairs(stories_data["test"], ReadOptions(kind="sft"), ReadResult())
    examples, _ = tokenize_pairs(tokenizer, [pair for pair, _ in zip(read, range(6), strict=False)], 64)
    objective = SftObjective(loss_on_prompt)
    batch = objective.collate(layout, examples, tokenizer.pad_token_id)
    assert batch.is_packed == (layout == "packed")
    with torch.no_grad():
        scores = objective.score(scoring_model(model), batch, None)
    nll, count, hits = _reference_token_nll(model, examples, loss_on_prompt)
    assert float(scores.loss_sum) == pytest.approx(nll, rel=1e-5)
    assert scores.details.token_logps.shape[0] == count
    assert int(scores.details.token_is_top.sum()) == hits
    # What one example weighs in a step's mean is exactly the tokens its sequence is scored on.
    rows = Dataset.from_list([{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids} for e in examples])
    assert objective.example_weights(rows) == batch.completion_lengths().tolist()


def test_packed_rows_lay_sequences_end_to_end_each_attending_to_itself():
    """Rows as wide as the longest sequence (first-fit decreasing, as DPO's packed layout), so never more rows nor
    wider ones than padding: the 6-token sequence has a row alone, the two 3-token ones share the next, unpadded."""
    examples = [
        {"prompt_ids": [1, 5], "chosen_ids": [6, 7, 9, 2]},
        {"prompt_ids": [1], "chosen_ids": [8, 2]},
        {"prompt_ids": [1, 4], "chosen_ids": [2]},
    ]
    batch = collate_sft("packed", examples, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 9, 2], [1, 8, 2, 1, 4, 2]]
    assert batch.attention_mask.all(), "no padding"
    assert batch.position_ids[1].tolist() == [0, 1, 2, 0, 1, 2]
    allowed = batch.attention_allowed()[1]
    assert not allowed[3:, :3].any(), "the second sequence of a row never sees the first"
    assert batch.completion_index.tolist() == [[-1, 0, 0, 0, 0, -1], [1, 1, -1, -1, 2, -1]]
    assert batch.target_ids[batch.scored].tolist() == [6, 7, 9, 2, 8, 2, 2]
    whole = collate_sft("padded", examples, pad_token_id=0, loss_on_prompt=True)
    assert whole.target_ids[whole.scored].tolist() == [5, 6, 7, 9, 2, 8, 2, 4, 2]  # every token but each first


# The command ----------------------------------------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sft_data_without_a_completion_is_one_line_exit_2_and_nothing_written(capsys, stories_model, tmp_path):
    data = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "A story."}, {"prompt": "Another."}])
    out = tmp_path / "run"
    code, _, err = run_cli_inprocess(
        capsys,
        "sft",
        "--model",
        stories_model,
        "--data",
        data,
        "--output-dir",
        out,
        "--set",
        f"data.cache_dir={tmp_path}",
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {data}:1: field 'completion': is missing; every record needs a completion: prompt and completion, "
        "messages with an assistant turn, text, or a preference pair's chosen (or pass --on-invalid skip to set bad "
        "records aside)"
    ]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "shared-prompt"], "--layout shared-prompt: sft lays out one sequence per example; use padded"),
        (["--format", "tex"], "recipe key data.format: 'tex' is not one of"),
    ],
)
def test_sft_refuses_bad_settings_in_one_line(capsys, stories_model, stories_data, tmp_path, args, message):
    out = tmp_path / "run"
    code, _, err = run_cli_inprocess(
        capsys, "sft", "--model", stories_model, "--data", stories_data["test"], "--output-dir", out, *args
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_a_preference_run_refuses_an_sft_format(capsys, stories_model, stories_data, tmp_path):
    code, _, err = run_cli_inprocess(
        capsys, "train", "--model", stories_model, "--data", stories_data["test"], "--output-dir", tmp_path / "r",
        "--format", "text", "--set", f"data.cache_dir={tmp_path}",
    )  # fmt: skip
    assert code == 2 and "--format text: is an SFT data format (for `dpo-cli sft`)" in err


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_sft_on_messages_runs_evaluates_and_its_folder_refuses_a_dpo_resume(capsys, stories_model, tmp_path):
    """Conversations through the whole command: a run folder with the SFT metrics, eval perplexity = exp(eval loss),
    recipe.yaml that `dpo-cli sft` repeats, and a `train --resume` into it refused (another objective)."""
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    conversations = [
        {
            "messages": [
                {"role": "user", "content": f"Tell story {i}."},
                {"role": "assistant", "content": "Once upon a time, a cat sat."},
                {"role": "user", "content": "More."},
                {"role": "assistant", "content": f"The cat ran {i} times and was happy."},
            ]
        }
        for i in range(12)
    ]
    data = _write_jsonl(tmp_path / "chats.jsonl", conversations)
    out = tmp_path / "run"
    common = ["--model", stories_model, "--data", data, "--output-dir", out, "--chat-template", template]
    common += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    code, stdout, err = run_cli_inprocess(
        capsys, "sft", *common, "--eval-split", "0.25", "--max-steps", "3", "--batch-size", "3", "--lr", "1e-3"
    )
    assert code == 0, err
    assert "train data: 9 examples (messages;" in stdout and "eval data: 3 examples" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "mean_token_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 <= r["mean_token_accuracy"] <= 1 and r["grad_norm"] > 0 for r in steps)
    final = records[-1]
    assert final["eval_num_examples"] == 3
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert (out / "recipe.yaml").read_text().startswith("# The fully resolved recipe of this run: `dpo-cli sft")
    for name in ("adapter_model.safetensors", "report.png", "README.md"):
        assert (out / name).exists(), name
    code, _, err = run_cli_inprocess(capsys, "train", *common, "--resume", "--max-steps", "4")
    assert code == 2 and "training.objective was 'sft', now 'dpo'" in err
