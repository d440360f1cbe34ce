"""Reports: report.png from `train` and `dpo-cli report`, the summary table, TensorBoard and wandb, the model card."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import yaml

from dpo_cli.run.report import METADATA_KEY, PANELS, is_report_file, summarize
from dpo_cli.run.run_folder import RunFolder, read_metrics
from tests.conftest import run_cli_inprocess

TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm")


def _train(*args) -> None:
    """`dpo-cli ARGS` in this process, with sys.argv as a user's shell would set it (the model card records it)."""
    from dpo_cli.cli import main

    argv, sys.argv = sys.argv, ["dpo-cli", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, f"dpo-cli {' '.join(sys.argv[1:])} exited with {exit_.code}"
    finally:
        sys.argv = argv


def _tiny_train_args(tiny, out, steps, *extra):
    return (
        "train",
        "--model", tiny["model"],
        "--data", tiny["train"],
        "--output-dir", out,
        "--max-steps", steps,
        "--batch-size", 8,
        "--lr", 5e-3,
        "--set", "model.gradient_checkpointing=false",
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def eval_run(untrained_tiny, tmp_path_factory):
    """4 steps, evaluated every 2, a checkpoint every 2, TensorBoard on; each report drawing is noted."""
    from dpo_cli.run import callbacks as callbacks_module

    out = tmp_path_factory.mktemp("reports") / "with-eval"
    drawn_at = []  # the last step in metrics.jsonl, and whether the final eval is there, at each drawing
    original = callbacks_module.write_run_report

    def noting(folder):
        records = read_metrics(folder / "metrics.jsonl")
        drawn_at.append((max(r["step"] for r in records), "loss" not in records[-1]))
        return original(folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(callbacks_module, "write_run_report", noting)
        _train(
            *_tiny_train_args(untrained_tiny, out, 4),
            "--eval-data", untrained_tiny["test"],
            "--report-to", "tensorboard",
            "--set", "training.save_steps=2",
            "--set", "training.eval_steps=2",
        )  # fmt: skip
    return {"dir": out, "drawn_at": drawn_at}


@pytest.fixture(scope="module")
def no_eval_run(untrained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "no-eval"
    _train(*_tiny_train_args(untrained_tiny, out, 2, "--set", "training.save_steps=0"))
    return out


def _png_metadata(path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return {"size": image.size, "colours": len(image.convert("RGB").getcolors(1 << 20)), **image.text}


def _panels(path) -> dict[str, list[str]]:
    metadata = json.loads(_png_metadata(path)[METADATA_KEY])
    return {panel["title"]: panel["metrics"] for panel in metadata["panels"]}


def test_the_last_checkpoint_leaves_the_drawing_to_the_end(untrained_tiny, tmp_path, monkeypatch):
    """A run whose last step is not a save step is checkpointed after the loop; report.png is drawn once, at the
    end with the final evaluation, not also at that checkpoint (drawing costs about a second)."""
    from dpo_cli.run import callbacks as callbacks_module

    drawn = []
    original = callbacks_module.write_run_report
    monkeypatch.setattr(callbacks_module, "write_run_report", lambda folder: drawn.append(folder) or original(folder))
    out = tmp_path / "run"
    _train(*_tiny_train_args(untrained_tiny, out, 2, "--set", "training.save_steps=0"))
    assert drawn == [out]
    assert any((out / "checkpoints").iterdir()), "the last checkpoint is still saved"
    assert (out / "report.png").is_file()


def test_train_draws_every_panel_at_each_checkpoint_and_at_the_end(eval_run):
    assert eval_run["drawn_at"] == [(2, False), (4, False), (4, True)], "checkpoints at 2 and 4, then the final eval"
    report = eval_run["dir"] / "report.png"
    metadata = _png_metadata(report)
    assert metadata["size"] == (1600, 800)
    assert metadata["colours"] > 100, "an image with curves and text on it, not a blank canvas"
    panels = _panels(report)
    assert list(panels) == [panel.title for panel in PANELS]
    both = ["rewards/chosen", "eval_rewards/chosen", "rewards/rejected", "eval_rewards/rejected"]
    assert panels == {
        "loss": ["loss", "eval_loss"],
        "reward accuracy": ["rewards/accuracies", "eval_rewards/accuracies"],
        "reward margin": ["rewards/margins", "eval_rewards/margins"],
        "chosen and rejected rewards": both,
        "drift from the reference": both,
        "learning rate": ["learning_rate"],
        "grad norm": ["grad_norm"],
        "throughput": ["tokens_per_second"],
    }


def test_drift_is_the_mean_policy_minus_reference_log_prob(eval_run, untrained_tiny):
    """The drift panel's final eval point, against log-probs scored here from the saved adapter, pair by pair."""
    import torch
    from peft import PeftModel

    from dpo_cli.config import ModelSection
    from dpo_cli.data.records import read_jsonl
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.dpo.layouts import collate_padded
    from dpo_cli.dpo.scoring import policy_logps, reference_logps
    from dpo_cli.model.load import load_base_model, load_tokenizer, scoring_model
    from dpo_cli.run.run_folder import read_run

    run = read_run(eval_run["dir"])
    drift = {m: run.points(f"eval_rewards/{m}", 1.0 / run.beta)[1][-1] for m in ("chosen", "rejected")}

    tokenizer = load_tokenizer(str(untrained_tiny["model"]))
    pairs, _ = tokenize_pairs(tokenizer, list(read_jsonl(untrained_tiny["test"])), 1024)
    base = load_base_model(ModelSection(path=str(untrained_tiny["model"])), torch.device("cpu"))
    model = scoring_model(PeftModel.from_pretrained(base, str(eval_run["dir"])).eval())
    differences = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for pair in pairs:  # one pair at a time: the plainest way to the per-completion sums
            batch = collate_padded([pair], tokenizer.pad_token_id)
            policy, reference = policy_logps(model, batch).sums, reference_logps(model, batch).sums  # (2,)
            differences["chosen"].append(float(policy[0] - reference[0]))
            differences["rejected"].append(float(policy[1] - reference[1]))
    for name, values in differences.items():
        assert drift[name] == pytest.approx(sum(values) / len(values), rel=1e-4, abs=1e-5), name
    assert abs(drift["chosen"]) > 1e-3, "the policy moved: a drift of zero would not test anything"


def test_tensorboard_event_files_hold_the_scalars(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_metrics(eval_run["dir"] / "metrics.jsonl")
    events = EventAccumulator(str(eval_run["dir"] / "tensorboard"))
    events.Reload()
    train = [r for r in records if "loss" in r]
    for key in (*TRAIN_KEYS, "learning_rate", "tokens_per_second"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train], key
    evals = [r for r in records if "eval_loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in evals] and len(evals) >= 2
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        logged = [e.value for e in events.Scalars(f"eval/{key}")]
        assert logged == [pytest.approx(r[f"eval_{key}"], rel=1e-6) for r in evals], key


def _wandb_records(path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, chunks
    of crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left for a chunk header: the block is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_holds_the_scalars(untrained_tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'dpo-cli[wandb]'); not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wandb-run"
    _train(
        *_tiny_train_args(untrained_tiny, out, 3, "--set", "training.save_steps=0"),
        "--eval-data", untrained_tiny["test"],
        "--report-to", "wandb",
        "--project", "dpo-cli-tests",
        "--run-name", "tiny",
    )  # fmt: skip
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, run_info = {}, None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_info = record.run
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
    assert (run_info.project, run_info.display_name) == ("dpo-cli-tests", "tiny")
    records = read_metrics(out / "metrics.jsonl")
    for record in records:
        logged = history[record["step"]]
        for key, value in record.items():
            if key in ("step", "time"):
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            assert logged[tag] == pytest.approx(value, rel=1e-9), (record["step"], tag)
    assert sorted(history) == [1, 2, 3]


def test_report_overlays_two_runs_and_prints_a_summary(eval_run, no_eval_run, tmp_path, capsys):
    output = tmp_path / "both.png"
    code, stdout, stderr = run_cli_inprocess(capsys, "report", eval_run["dir"], no_eval_run, "--output", output)
    assert code == 0, stderr
    metadata = json.loads(_png_metadata(output)[METADATA_KEY])
    assert metadata["runs"] == ["with-eval", "no-eval"]
    assert _panels(output)["loss"] == ["loss", "eval_loss"], "the eval points of the run that has them"
    lines = stdout.splitlines()
    assert "with-eval" in lines[1] and "no-eval" in lines[1]
    steps_row = next(line for line in lines if line.startswith("│ steps"))
    assert [cell.strip() for cell in steps_row.split("│")[1:-1]] == ["steps", "4", "2"]
    assert "best eval loss" in stdout and f"written to {output}" in stdout

    for suffix, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
        code, _, stderr = run_cli_inprocess(capsys, "report", eval_run["dir"], "--output", tmp_path / f"r{suffix}")
        assert code == 0, stderr
        assert (tmp_path / f"r{suffix}").read_bytes().startswith(magic)
        assert is_report_file(tmp_path / f"r{suffix}"), "its marker: the next report may replace it"
    assert is_report_file(output)


def test_a_run_without_eval_data_draws_without_eval_curves(no_eval_run):
    panels = _panels(no_eval_run / "report.png")
    assert list(panels) == [panel.title for panel in PANELS]
    assert panels["loss"] == ["loss"] and panels["drift from the reference"] == ["rewards/chosen", "rewards/rejected"]
    assert not [name for names in panels.values() for name in names if name.startswith("eval_")]


def test_model_card_is_hugging_face_front_matter_with_the_base_model(eval_run, untrained_tiny):
    from dpo_cli.data.cache import file_fingerprint

    text = (eval_run["dir"] / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header_text, body = text[4:].split("\n---\n", 1)
    header = yaml.safe_load(header_text)
    assert header["base_model"] == str(untrained_tiny["model"])
    assert header["library_name"] == "peft" and header["tags"][:2] == ["dpo", "qlora"]
    assert header["datasets"] == ["train.jsonl", "test.jsonl"]
    assert f"dpo-cli train --model {untrained_tiny['model']}" in body
    assert file_fingerprint(untrained_tiny["train"]) in body and file_fingerprint(untrained_tiny["test"]) in body
    assert "Pairs used: train 40 pairs, eval 10 pairs." in body
    final_eval = read_metrics(eval_run["dir"] / "metrics.jsonl")[-1]
    assert f"{final_eval['eval_loss']:.4f} |" in body
    assert "![training curves](report.png)" in body


# Bad input: one line, exit code 2, before any slow work -----------------------------------------------------------


def test_a_missing_tracker_package_is_one_line_naming_the_pip_install(untrained_tiny, tmp_path, capsys, monkeypatch):
    from dpo_cli.run import trackers

    monkeypatch.setattr(trackers, "is_installed", lambda module: False)
    out = tmp_path / "run"
    code, _, stderr = run_cli_inprocess(capsys, *_tiny_train_args(untrained_tiny, out, 2), "--report-to", "wandb")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "the wandb package is not installed; run `pip install wandb`" in stderr
    assert not out.exists(), "nothing written"


def test_an_unknown_tracker_is_refused(untrained_tiny, tmp_path, capsys):
    code, _, stderr = run_cli_inprocess(
        capsys, *_tiny_train_args(untrained_tiny, tmp_path / "r", 2), "--report-to", "mlflow"
    )
    assert code == 2
    assert stderr == "error: recipe key report.trackers: 'mlflow' is not one of tensorboard, wandb\n"


def test_report_to_accepts_a_comma_list_and_none():
    from dpo_cli.config import ReportSection

    assert ReportSection(trackers=["tensorboard,wandb", "tensorboard"]).trackers == ["tensorboard", "wandb"]
    assert ReportSection(trackers=["none"]).trackers == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "metrics.jsonl: not found; pass a folder written by `dpo-cli train`"),
        ('{"step": 1, "loss": 0.6}\nnot json\n{"step": 2, "loss": 0.5}\n', "metrics.jsonl:2: not a JSON record"),
        ('{"loss": 0.6}\n', "metrics.jsonl:1: a metrics record needs an integer 'step'"),
        ('{"step": 1, "eval_loss": 0.6}\n', "no training step recorded yet"),
    ],
)
def test_report_of_a_bad_folder_is_one_line(tmp_path, capsys, lines, message):
    if lines is not None:
        (tmp_path / "metrics.jsonl").write_text(lines)
    code, _, stderr = run_cli_inprocess(capsys, "report", tmp_path)
    assert code == 2 and len(stderr.splitlines()) == 1 and message in stderr
    assert not (tmp_path / "report.png").exists()


def test_report_refuses_an_unknown_figure_format_before_reading(tmp_path, capsys):
    code, _, stderr = run_cli_inprocess(capsys, "report", tmp_path / "missing", "--output", tmp_path / "r.jpg")
    assert code == 2 and "r.jpg: a report is drawn as .png, .svg, .pdf" in stderr


# The summary, on numbers worked out by hand ------------------------------------------------------------------------


def test_summary_of_a_running_run_by_hand(tmp_path):
    """Three steps of 100, 300 and 200 tokens at 100, 150 and 100 tokens/s: 1 s, 2 s and 2 s in steps, so 600
    tokens in 5 s is 120 tokens/s. The records were stamped at 10, 13 and 16 s, the first step began 1 s before
    its stamp: 7 s of wall time. The evals: loss 0.6 at step 2 then 0.65 at step 3, so the best is step 2's.
    The last line is half-written, as when the trainer is writing it: it is left out."""
    records = [
        {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "num_tokens": 100, "tokens_per_second": 100, "time": 10},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75, "num_tokens": 400, "tokens_per_second": 150, "time": 13,
         "eval_loss": 0.6, "eval_rewards/accuracies": 0.9},
        {"step": 3, "loss": 0.5, "rewards/accuracies": 1.0, "num_tokens": 600, "tokens_per_second": 100, "time": 16,
         "eval_loss": 0.65, "eval_rewards/accuracies": 0.9},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    from dpo_cli.run.run_folder import read_run

    summary = summarize(read_run(tmp_path))
    assert summary.steps == 3
    assert summary.tokens_per_second == pytest.approx(120.0)
    assert summary.wall_seconds == pytest.approx(7.0)
    assert summary.final == {"loss": 0.5, "rewards/accuracies": 1.0}
    assert summary.final_eval == {"loss": 0.65, "rewards/accuracies": 0.9}
    assert summary.best_eval_loss == (0.6, 2) and summary.best_eval_accuracy == (0.9, 2)


def test_drift_is_not_drawn_for_a_reference_free_run(tmp_path):
    """SimPO's rewards are β·mean log-prob, not log-ratios against a reference: there is no drift to draw."""
    from dpo_cli.run.report import draw_report

    record = {"step": 1, "loss": 0.7, "rewards/chosen": -2.0, "rewards/rejected": -2.5}
    run = RunFolder.from_records("simpo", tmp_path, [record], {"dpo": {"reference_free": True, "beta": 2.0}})
    panels = _panels(draw_report([run], tmp_path / "simpo.png").path)
    assert panels["drift from the reference"] == []
    assert panels["chosen and rejected rewards"] == ["rewards/chosen", "rewards/rejected"]
