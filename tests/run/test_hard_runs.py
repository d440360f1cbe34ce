"""Runs that fail, get killed or are resumed: hostile checkpoint files, changed settings on --resume, divergence,
torn metrics, stale temporaries, durable writes, a full disk, kill -9 and SIGTERM. Nothing is lost, nothing runs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_cli.errors import UserError
from tests.conftest import REPO, run_cli_inprocess

STEP_DIR = "step-000002"


def _train_args(data: dict, out: Path, steps: int = 2, *extra) -> tuple:
    return (
        "train",
        "--model", data["model"],
        "--data", data["train"],
        "--output-dir", out,
        "--max-steps", steps,
        "--batch-size", 4,
        "--lr", 3e-3,
        "--set", "training.save_steps=2",
        "--set", "model.gradient_checkpointing=false",
        *extra,
    )  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _dead_pid() -> int:
    """The id of a process that has exited (what a killed run's temporary names carry)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def two_step_run(untrained_tiny, tmp_path_factory) -> Path:
    """A finished 2-step run with its checkpoint at step 2; tests copy it before changing anything."""
    from tests.conftest import train_adapter

    out = tmp_path_factory.mktemp("two-step") / "run"
    train_adapter(out, untrained_tiny["model"], untrained_tiny["train"], 2, "--batch-size", "4", "--lr", "3e-3")
    # train_adapter sets save_steps=0: the run still saves its last step as a checkpoint
    assert (out / "checkpoints" / STEP_DIR / "rng.pt").is_file()
    return out


@pytest.fixture
def run_copy(two_step_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_step_run, copy)
    return copy


def _resume_args(untrained_tiny, out: Path, steps: int = 3, *extra) -> tuple:
    return (
        "train",
        "--model", untrained_tiny["model"],
        "--data", untrained_tiny["train"],
        "--output-dir", out,
        "--max-steps", steps,
        "--batch-size", 4,
        "--lr", 3e-3,
        "--set", "training.save_steps=0",
        "--set", "model.gradient_checkpointing=false",
        "--resume",
        *extra,
    )  # fmt: skip


# Checkpoint files are never unpickled -------------------------------------------------------------------------------


class _WritesAMarker:
    """Unpickling this object would create the file at `path`: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_rng_file_does_not_run_and_is_one_line(run_copy, untrained_tiny, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    rng_file = run_copy / "checkpoints" / STEP_DIR / "rng.pt"
    torch.save({"torch": torch.get_rng_state(), "python": _WritesAMarker(str(marker))}, rng_file)
    torch.load(rng_file, weights_only=False)  # the file is a real attack: loaded with pickle, its code runs
    assert marker.exists()
    marker.unlink()

    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy))
    assert code == 2
    line = _one_error_line(stderr)
    assert "rng.pt" in line and "never loaded" in line, line
    assert not marker.exists(), "the pickled object's code ran"


CHECKPOINT_FILES = ["optimizer.pt", "scheduler.pt", "rng.pt", "adapter_model.safetensors", "trainer_state.json"]


def _garbage(file: Path) -> None:
    """Text (the issue's case: /etc/passwd's lines): torch's unpickler ended in an IndexError traceback on it."""
    file.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _passwd_link(file: Path) -> None:
    file.unlink()
    file.symlink_to("/etc/passwd")


def _all_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path (a link by its target); the lock file's pid is not content."""
    return {
        str(path.relative_to(folder)): str(path.readlink()).encode() if path.is_symlink() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if (path.is_file() or path.is_symlink()) and path.name != ".dpo-cli.lock"
    }


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("damage", [_garbage, _empty, _truncated, _passwd_link], ids=lambda f: f.__name__[1:])
def test_a_checkpoint_file_that_is_not_ours_is_one_line_and_nothing_is_written(
    run_copy, untrained_tiny, capsys, monkeypatch, name, damage
):
    """Refused before the base model loads: a damaged file costs seconds, not the minutes a large base takes."""
    from dpo_cli.run import setup as setup_module

    monkeypatch.setattr(setup_module, "load_base_model", _must_not_load)
    damage(run_copy / "checkpoints" / STEP_DIR / name)
    before = _all_files(run_copy)
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy))
    assert code == 2
    line = _one_error_line(stderr)
    what = "is a symbolic link" if damage is _passwd_link else "checkpoint file is unreadable"
    assert f"{STEP_DIR}/{name}: {what}" in line and "delete" in line, line
    assert _all_files(run_copy) == before


@pytest.mark.parametrize("name", ["adapter_config.json", "README.md", STEP_DIR])
def test_a_link_anywhere_in_a_checkpoint_is_refused_before_the_model_loads(
    run_copy, untrained_tiny, capsys, monkeypatch, name
):
    """Files resume does not read, and the step folder itself: dpo-cli never writes a link there."""
    from dpo_cli.run import setup as setup_module

    monkeypatch.setattr(setup_module, "load_base_model", _must_not_load)
    path = run_copy / "checkpoints" / name
    if name == STEP_DIR:
        shutil.move(path, run_copy / "elsewhere")
        path.symlink_to(run_copy / "elsewhere")
    else:
        path = run_copy / "checkpoints" / STEP_DIR / name
        path.unlink()
        path.symlink_to("/etc/passwd")
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy))
    assert code == 2
    assert f"{path}: is a symbolic link" in _one_error_line(stderr)


def _rewrite_adapter(folder: Path, change) -> None:
    from safetensors.torch import save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def _nan_weight(tensors: dict) -> None:
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")


def _other_shape(tensors: dict) -> None:
    tensors[sorted(tensors)[0]] = torch.zeros(3, 3)


def _missing_weight(tensors: dict) -> None:
    del tensors[sorted(tensors)[0]]


def _nan_moment(folder: Path) -> None:
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"]))  # keyed by parameter name
    state["state"][first]["exp_avg"][0] = float("inf")
    torch.save(state, folder / "optimizer.pt")


def _moment_of_other_shape(folder: Path) -> None:
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"]))  # keyed by parameter name
    state["state"][first]["exp_avg"] = torch.zeros(2, 2)
    torch.save(state, folder / "optimizer.pt")


def _state_of_other_types(folder: Path) -> None:
    file = folder / "trainer_state.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "step": "two"}))


@pytest.mark.parametrize(
    ("damage", "message", "before_the_model"),
    [
        (lambda f: _rewrite_adapter(f, _nan_weight), "not finite", True),
        (lambda f: _rewrite_adapter(f, _other_shape), "has lora_A of rank 3 but lora_B of rank 16", True),
        (lambda f: _rewrite_adapter(f, _missing_weight), "has a lora_A matrix missing", True),
        # The moments are checked against their weights' shapes, which only the model has.
        (_nan_moment, "optimizer.pt: checkpoint file is unreadable (its exp_avg holds NaN", False),
        (_moment_of_other_shape, "optimizer.pt: checkpoint file is unreadable (its exp_avg has shape (2, 2)", False),
        (_state_of_other_types, "trainer_state.json: checkpoint file is unreadable (step is 'two', not a count", True),
    ],
    ids=["nan-adapter", "adapter-shape", "adapter-missing", "nan-moment", "moment-shape", "state-types"],
)
def test_well_formed_checkpoint_files_with_wrong_contents_are_one_line(
    run_copy, untrained_tiny, capsys, monkeypatch, damage, message, before_the_model
):
    from dpo_cli.run import setup as setup_module

    if before_the_model:
        monkeypatch.setattr(setup_module, "load_base_model", _must_not_load)
    damage(run_copy / "checkpoints" / STEP_DIR)
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy))
    assert code == 2
    assert message in _one_error_line(stderr)


def test_a_truncated_trainer_state_is_one_line_before_the_model_loads(run_copy, untrained_tiny, capsys, monkeypatch):
    from dpo_cli.run import setup as setup_module

    monkeypatch.setattr(setup_module, "load_base_model", _must_not_load)
    file = run_copy / "checkpoints" / STEP_DIR / "trainer_state.json"
    file.write_text(file.read_text()[:40])
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy))
    assert code == 2
    assert "trainer_state.json: checkpoint file is unreadable" in _one_error_line(stderr)


def test_checkpoint_state_files_load_with_weights_only(run_copy):
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(run_copy / "checkpoints" / STEP_DIR / name, weights_only=True)


# Changed settings on --resume ---------------------------------------------------------------------------------------


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the resume settings were checked")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--batch-size", 2), "training.batch_size was 4, now 2"),
        (("--set", "lora.r=4"), "lora.r was 16, now 4"),
        (("--set", "training.seed=7"), "training.seed was 42, now 7"),
        (("--beta", 0.5), "dpo.beta was 0.1, now 0.5"),
        (("--max-length", 64), "data.max_length was 1024, now 64"),
    ],
)
def test_resume_refuses_a_changed_fixed_setting_before_loading_the_model(
    run_copy, untrained_tiny, capsys, monkeypatch, extra, message
):
    from dpo_cli.run import setup as setup_module

    monkeypatch.setattr(setup_module, "load_base_model", _must_not_load)
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy), *extra)
    assert code == 2
    line = _one_error_line(stderr)
    assert message in line and "cannot resume with changed settings" in line, line


def test_resume_refuses_other_data_and_another_model(run_copy, untrained_tiny, tiny_demo, tmp_path, capsys):
    edited = tmp_path / "edited.jsonl"
    lines = untrained_tiny["train"].read_text().splitlines()
    edited.write_text("\n".join(lines[1:]) + "\n")
    args = list(_resume_args(untrained_tiny, run_copy))
    args[args.index("--data") + 1] = edited
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2 and "data.train was" in _one_error_line(stderr) and "content" in stderr

    args = list(_resume_args(untrained_tiny, run_copy))
    args[args.index("--model") + 1] = tiny_demo["model"]
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2
    line = _one_error_line(stderr)
    assert f"model.path was '{untrained_tiny['model']}', now '{tiny_demo['model']}'" in line, line


def test_resume_applies_a_new_learning_rate_and_says_so(run_copy, untrained_tiny, capsys):
    from dpo_cli.run.setup import lr_lambda

    code, stdout, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy, 4, "--lr", 1e-2))
    assert code == 0, stderr
    assert "changed settings, applied from step 3: training.lr 0.003 -> 0.01" in " ".join(stdout.split())
    assert "training.max_steps 2 -> 4" in " ".join(stdout.split())
    records = [r for r in _records(run_copy) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records[2:]:  # warmup: int(0.1 * 4) = 0 steps; cosine over the new 4 steps
        expected = 1e-2 * lr_lambda(record["step"] - 1, 4, 0, "cosine")
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-12), record["step"]
    # The optimizer itself ran with it (not only the log): its saved groups carry the new peak and step-4 rate.
    groups = torch.load(run_copy / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)["param_groups"]
    assert groups[0]["initial_lr"] == 1e-2
    assert groups[0]["lr"] == pytest.approx(1e-2 * lr_lambda(4, 4, 0, "cosine"), abs=1e-15)


def test_resume_takes_a_changed_precompute_ref_and_says_so(run_copy, untrained_tiny, capsys, tmp_path, monkeypatch):
    """precompute_ref changes when the reference is scored, not its values (to rounding): a resume may change it."""
    # A cache of its own: another test's run of the same pairs would leave them cached, and they would be read.
    monkeypatch.setenv("DPO_CLI_CACHE", str(tmp_path / "cache"))
    args = _resume_args(untrained_tiny, run_copy, 3, "--set", "dpo.precompute_ref=true")
    code, stdout, stderr = run_cli_inprocess(capsys, *args)
    assert code == 0, stderr
    said = " ".join(stdout.split())
    assert "dpo.precompute_ref 'auto' -> 'true'" in said and "reference log-probs: computed 40 pairs" in said, said
    assert [r["step"] for r in _records(run_copy) if "loss" in r] == [1, 2, 3]


# Divergence ---------------------------------------------------------------------------------------------------------


def test_an_infinite_gradient_stops_before_the_update_with_exit_3(untrained_tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, 4, "--beta", 1e30))
    assert code == 3
    line = _one_error_line(stderr)
    assert line.startswith("error: step 1: the gradient norm is inf") and "--beta (now 1e+30)" in line, line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_non_finite_weights_after_an_update_are_never_saved(untrained_tiny, tmp_path, capsys, monkeypatch):
    """An update can overflow the weights with finite loss and gradients; the step is refused, not checkpointed."""
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    code, _, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, 6))
    assert code == 3
    assert _one_error_line(stderr).startswith("error: step 4: the adapter weights became non-finite")
    assert [p.name for p in (out / "checkpoints").iterdir()] == [STEP_DIR]
    adapter = load_file(str(out / "checkpoints" / STEP_DIR / "adapter_model.safetensors"))
    assert all(torch.isfinite(value).all() for value in adapter.values())
    assert [r["step"] for r in _records(out)] == [1, 2, 3]


@pytest.mark.slow
def test_the_issue_repro_lr_1e6_keeps_no_nan_checkpoint(stories_model, stories_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = (
        "train", "--model", stories_model, "--data", stories_data["train"], "--output-dir", out,
        "--max-steps", 5, "--max-length", 128, "--lr", 1e6,
        "--set", "training.save_steps=1", "--set", "training.warmup_ratio=0",
    )  # fmt: skip
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 3 and "--lr (now 1e+06)" in _one_error_line(stderr)
    for checkpoint in (out / "checkpoints").iterdir():
        adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert all(torch.isfinite(value).all() for value in adapter.values()), checkpoint.name


# Torn metrics -------------------------------------------------------------------------------------------------------


def test_resume_repairs_a_torn_metrics_tail(run_copy, untrained_tiny, capsys):
    metrics = run_copy / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "loss": 0.69, "rewa')  # what a disk full during an append leaves
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy, 3))
    assert code == 0, stderr
    assert [r["step"] for r in _records(run_copy) if "loss" in r] == [1, 2, 3]


def test_a_broken_metrics_line_before_the_end_is_one_line(tmp_path):
    from dpo_cli.run.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON metrics record"):
        MetricsLog(path).truncate_after(3)


# Stale temporaries --------------------------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_go_and_nothing_else(tmp_path):
    from dpo_cli.files import remove_stale_temporaries

    dead = _dead_pid()
    stale = [f".step-000004.{dead}.abcd_123.tmp", ".step-000006.x1y2z3w4.tmp"]  # the second: older, pid-less names
    alive = f".step-000008.{os.getpid()}.abcdefgh.tmp"  # a save in progress in a live process
    others = ["step-000002", ".step-notes.tmp", "step-000004.abcdefgh.tmp", ".other.12.abcdefgh.tmp"]
    for name in [*stale, alive, *others]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    removed = remove_stale_temporaries(tmp_path, r"step-\d+")
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive, *others])


def test_a_train_start_removes_what_killed_writes_of_its_own_files_left(tmp_path):
    """Every file train writes atomically in its folder, the model card and report.png too, is one the next start
    cleans up after when a kill left its temporary."""
    from dpo_cli.run.setup import _remove_stale_temporaries

    dead = _dead_pid()
    targets = ["README.md", "report.png", "recipe.yaml", "metrics.jsonl", "train_summary.txt", "final"]
    stale = [f".{name}.{dead}.abcdefgh.tmp" for name in targets]
    for name in stale:
        (tmp_path / name).write_text("cut short")
    (tmp_path / "notes.md").write_text("the user's")
    _remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


def test_a_replacement_killed_between_its_renames_puts_the_old_folder_back(tmp_path):
    from dpo_cli.files import remove_stale_temporaries

    old = tmp_path / f".merged.{_dead_pid()}.old"  # killed after moving `merged` aside, before renaming the new one
    old.mkdir()
    (old / "model.safetensors").write_text("the previous merge")
    remove_stale_temporaries(tmp_path, "merged")
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "the previous merge"
    assert not old.exists()


def test_train_resume_and_merge_remove_stale_temporaries(run_copy, untrained_tiny, tmp_path, capsys):
    dead = _dead_pid()
    checkpoint_tmp = run_copy / "checkpoints" / f".step-000003.{dead}.abcdefgh.tmp"
    final_tmp = run_copy / f".final.{dead}.abcdefgh.tmp"
    metrics_tmp = run_copy / f".metrics.jsonl.{dead}.abcdefgh.tmp"
    checkpoint_tmp.mkdir()
    final_tmp.mkdir()
    metrics_tmp.write_text("{")
    code, _, stderr = run_cli_inprocess(capsys, *_resume_args(untrained_tiny, run_copy, 2))
    assert code == 0, stderr
    assert not checkpoint_tmp.exists() and not final_tmp.exists() and not metrics_tmp.exists()

    merged_tmp = tmp_path / f".merged.{dead}.abcdefgh.tmp"
    merged_tmp.mkdir()
    (merged_tmp / "model.safetensors").write_bytes(b"\0" * 1024)
    bystander = tmp_path / ".merged-notes.txt"
    bystander.write_text("not ours")
    args = ("merge-adapter", "--adapter", run_copy, "--output", tmp_path / "merged", "--dtype", "float32")
    code, _, stderr = run_cli_inprocess(capsys, *args)
    assert code == 0, stderr
    assert not merged_tmp.exists() and bystander.read_text() == "not ours"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


# Durable writes -----------------------------------------------------------------------------------------------------


def _record_fsyncs(monkeypatch) -> list[str]:
    synced = []
    original = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return original(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced descriptors")
def test_atomic_writes_fsync_the_files_and_then_their_folder(tmp_path, monkeypatch):
    from dpo_cli.files import atomic_directory, write_text_atomic

    synced = _record_fsyncs(monkeypatch)
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert synced[-1] == str(tmp_path), "the folder is fsynced after the rename"
    assert any(".a.txt." in path for path in synced[:-1]), "the file is fsynced before it"

    synced.clear()
    with atomic_directory(tmp_path / "folder") as staging:
        (staging / "one").write_text("1")
        (staging / "sub").mkdir()
        (staging / "sub" / "two").write_text("2")
    staged = [path for path in synced if ".folder." in path]
    assert sum(path.endswith(("/one", "/two")) for path in staged) == 2, synced
    assert synced[-1] == str(tmp_path) and (tmp_path / "folder" / "sub" / "two").read_text() == "2"


# A full disk --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root in a sandbox that allows mounts), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem to fill")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {result.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as handle:
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    with contextlib.suppress(OSError), filler.open("ab") as handle:  # the last partial page
        while True:
            handle.write(b"\0")
            handle.flush()
    return filler


def test_a_metrics_append_on_a_full_disk_leaves_only_whole_lines(tmp_path):
    from dpo_cli.run.metrics import MetricsLog

    with small_tmpfs(tmp_path / "disk", "8k") as disk:
        log = MetricsLog(disk / "metrics.jsonl")
        with pytest.raises(OSError) as raised:
            for step in range(1, 10_000):
                log.write({"step": step, "loss": 0.5, "padding": "x" * 300})
        assert raised.value.errno == errno.ENOSPC
        lines = (disk / "metrics.jsonl").read_text().split("\n")
        assert lines[-1] == "" and all(json.loads(line)["step"] for line in lines[:-1])
        assert len(lines) - 1 == step - 1


def test_disk_full_during_training_is_one_line_and_resume_loses_nothing(untrained_tiny, tmp_path, capsys, monkeypatch):
    from dpo_cli.run.callbacks import Callback
    from dpo_cli.run.checkpoint import read_state
    from tests.run.extra_callbacks import add_callback

    straight = tmp_path / "straight"
    assert run_cli_inprocess(capsys, *_train_args(untrained_tiny, straight, 6))[0] == 0

    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "run"
        filled = []

        class FillAfterStep2(Callback):  # runs after the checkpointer has saved step 2
            def on_step_end(self, run, record):
                if run.state.step == 2:
                    filled.append(_fill(disk))

        with pytest.MonkeyPatch.context() as patch:
            add_callback(patch, FillAfterStep2())
            code, _, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, 6))
        assert code == 2
        line = _one_error_line(stderr)
        assert line.startswith("error: disk full while writing") and "free space and rerun with --resume" in line
        # The previous checkpoint is whole, nothing half-written is left, every metrics line parses.
        assert [p.name for p in (out / "checkpoints").iterdir()] == [STEP_DIR]
        assert read_state(out / "checkpoints" / STEP_DIR).step == 2
        assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
        assert all(r["step"] <= 4 for r in _records(out))

        filled[0].unlink()
        code, _, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, 6, "--resume"))
        assert code == 0, stderr
        _assert_same_curves(straight, out)


def _assert_same_curves(expected_dir: Path, resumed_dir: Path) -> None:
    expected = [r for r in _records(expected_dir) if "loss" in r]
    resumed = [r for r in _records(resumed_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final_a = load_file(str(expected_dir / "adapter_model.safetensors"))
    final_b = load_file(str(resumed_dir / "adapter_model.safetensors"))
    for key, value in final_a.items():
        torch.testing.assert_close(final_b[key], value, rtol=1e-6, atol=1e-8)


def test_disk_full_during_merge_is_one_line_and_leaves_nothing(two_step_run, tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        args = ("merge-adapter", "--adapter", two_step_run, "--output", disk / "merged", "--dtype", "float32")
        code, _, stderr = run_cli_inprocess(capsys, *args)
        assert code == 2
        line = _one_error_line(stderr)
        assert line.startswith(f"error: disk full while writing the merged model into {disk / 'merged'}"), line
        assert list(disk.iterdir()) == []


# kill -9 and SIGTERM ------------------------------------------------------------------------------------------------

SAVE_LOOP = """
import sys, torch
from dpo_cli.run.checkpoint import TrainerState, save_checkpoint
from dpo_cli.config import LoraSection, ModelSection
from dpo_cli.model.load import add_lora, load_base_model, trainable_parameters

model_path, out, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = add_lora(load_base_model(ModelSection(path=model_path), torch.device("cpu")), LoraSection(), False)
params = trainable_parameters(model)
optimizer = torch.optim.AdamW(params, lr=1e-3)
for param in params:
    param.grad = torch.ones_like(param)
optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
while True:
    step += 1
    save_checkpoint(out, model, optimizer, scheduler, TrainerState(step, step, 10**9), keep=2)
    print(step, flush=True)
"""


def _subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _check_whole_checkpoint(folder: Path) -> None:
    from dpo_cli.run.checkpoint import read_state

    assert read_state(folder).step == int(folder.name.split("-")[1])
    assert load_file(str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)


@pytest.mark.slow
def test_kill_9_at_random_points_of_checkpoint_saves_keeps_every_checkpoint_whole(untrained_tiny, tmp_path):
    from dpo_cli.run.checkpoint import (
        checkpoint_dirs,
        latest_checkpoint,
        read_state,
        remove_stale_checkpoint_temporaries,
    )

    out = tmp_path / "run"
    chance = random.Random(8)
    last = 0
    for _ in range(3):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(untrained_tiny["model"]), str(out), str(last)],
            stdout=subprocess.PIPE,
            text=True,
            env=_subprocess_env(),
        )
        assert saver.stdout.readline().strip(), "the save loop did not save once"
        time.sleep(chance.uniform(0.0, 0.4))  # a save takes milliseconds: this lands anywhere in one
        saver.kill()
        saver.wait()
        assert saver.returncode == -signal.SIGKILL
        # What the next start sees: whole checkpoints only, and it clears what the killed save left.
        remove_stale_checkpoint_temporaries(out)
        assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
        for folder in checkpoint_dirs(out):
            _check_whole_checkpoint(folder)
        assert read_state(latest_checkpoint(out)).step > last
        last = read_state(latest_checkpoint(out)).step


@pytest.mark.slow
def test_sigterm_and_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(untrained_tiny, tmp_path, capsys):
    steps = 40
    straight = tmp_path / "straight"
    assert run_cli_inprocess(capsys, *_train_args(untrained_tiny, straight, steps))[0] == 0

    out = tmp_path / "run"
    args = [sys.executable, "-m", "dpo_cli", *map(str, _train_args(untrained_tiny, out, steps))]

    def start_and_wait_for_steps(command: list[str], count: int) -> subprocess.Popen:
        run = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_subprocess_env()
        )
        metrics = out / "metrics.jsonl"
        while run.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < count):
            time.sleep(0.01)
        assert run.poll() is None, "the run ended before it could be stopped; make it longer"
        return run

    # SIGTERM (what a scheduler sends to preempt): a checkpoint, one line, exit 130.
    run = start_and_wait_for_steps(args, 3)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    line = _one_error_line(stderr)
    assert "by SIGTERM; checkpoint saved" in line and "--resume" in line, line
    stopped_at = int(line.split("interrupted at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir()

    # kill -9 of the resumed run: no cleanup at all; the last whole checkpoint is what the next resume starts from.
    run = start_and_wait_for_steps([*args, "--resume"], stopped_at + 5)
    run.kill()
    run.wait()

    code, _, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, steps, "--resume"))
    assert code == 0, stderr
    _assert_same_curves(straight, out)


@pytest.mark.slow
def test_sigterms_at_the_end_of_a_run_leave_every_output_and_exit_130(untrained_tiny, tmp_path):
    """The issue's case: two SIGTERMs 50 ms apart while the final outputs were written exited 143 with no report.png
    (the first cut the outputs short, the second landed in the interpreter's teardown, where Python's default
    handler is back). Here SIGTERMs every 50 ms from the final adapter's first file until the process ends."""
    out = tmp_path / "run"
    no_report_before_the_end = ("--set", "training.save_steps=0")  # a checkpoint's report.png would hide the bug
    run = subprocess.Popen(
        [sys.executable, "-m", "dpo_cli", *map(str, _train_args(untrained_tiny, out, 2, *no_report_before_the_end))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    while run.poll() is None and not (out / "adapter_model.safetensors").exists():
        time.sleep(0.002)
    assert run.poll() is None, "the run ended before the signals; the test no longer tests anything"
    signals = 0
    while run.poll() is None:
        run.send_signal(signal.SIGTERM)
        signals += 1
        time.sleep(0.05)
    _, stderr = run.communicate(timeout=60)
    assert signals >= 2
    assert run.returncode == 130, (run.returncode, stderr)
    line = _one_error_line(stderr)
    assert "interrupted by SIGTERM after the last step (2); the final outputs were written" in line, line
    assert (out / "report.png").stat().st_size > 0
    assert "dpo-cli" in (out / "README.md").read_text(), "the model card, not PEFT's README"
    assert load_file(str(out / "adapter_model.safetensors"))
    assert (out / "train_summary.txt").is_file()


def test_a_held_block_finishes_and_only_the_first_signal_raises(monkeypatch):
    from dpo_cli.run import interrupts

    previous = interrupts.install()
    try:
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # a handler that raised would raise here
            finished = True
        assert finished and interrupts.received() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a held block refuses to start once a signal came
            with interrupts.held():
                pass
        os.kill(os.getpid(), signal.SIGINT)  # a second signal is remembered only: it cannot cut a save short
        time.sleep(0.05)
        assert interrupts.received() == "SIGTERM"
    finally:
        interrupts.restore(previous)
    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert interrupts.received() == "SIGINT"
    finally:
        interrupts.restore(previous)


def _tree(folder: Path) -> dict[str, bytes]:
    """Each file's bytes; the lock file (the pid of whoever held it last) is not content."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != ".dpo-cli.lock"}


@pytest.mark.slow
def test_kill_9_during_a_merge_keeps_the_previous_output_whole(two_step_run, tmp_path, capsys):
    output = tmp_path / "merged"
    merge_args = ("merge-adapter", "--adapter", two_step_run, "--output", output, "--dtype", "float32", "--force")
    assert run_cli_inprocess(capsys, *merge_args)[0] == 0
    before = _tree(output)
    chance = random.Random(3)
    for _ in range(2):
        merge = subprocess.Popen(
            [sys.executable, "-m", "dpo_cli", *map(str, merge_args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_subprocess_env(),
        )
        while merge.poll() is None and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]:
            time.sleep(0.002)
        time.sleep(chance.uniform(0.0, 0.05))  # somewhere in writing, checking or renaming the new folder
        merge.kill()
        merge.wait()
        # Merging is deterministic: whether the kill came before or after the rename, `merged` is a whole merge.
        assert _tree(output) == before
    assert run_cli_inprocess(capsys, *merge_args)[0] == 0
    assert _tree(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "stale temporaries removed"


# Interrupts during startup ------------------------------------------------------------------------------------------


def _swallow_an_interrupt(*args, **kwargs):
    """What some libraries do with a Ctrl-C that lands in them: catch it and carry on."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
    except KeyboardInterrupt:
        pass


def _convert_an_interrupt(*args, **kwargs):
    """What transformers' lazy modules do with one that lands in an import: re-raise it as another error."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        raise ModuleNotFoundError("Could not import module 'LlamaConfig'") from None


@pytest.mark.parametrize("library", [_swallow_an_interrupt, _convert_an_interrupt])
def test_an_interrupt_during_startup_ends_in_130_whatever_a_library_makes_of_it(
    untrained_tiny, tmp_path, capsys, monkeypatch, library
):
    from dpo_cli.run import setup as setup_module

    monkeypatch.setattr(setup_module, "_set_seed", library)  # runs between the checks and loading the tokenizer
    out = tmp_path / "run"
    code, stdout, stderr = run_cli_inprocess(capsys, *_train_args(untrained_tiny, out, 2))
    assert code == 130 and _one_error_line(stderr) == "error: interrupted", stderr
    assert "done:" not in stdout and not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_sigint_reaches_a_run_started_with_sigint_ignored(untrained_tiny, tmp_path):
    """A non-interactive shell starts background jobs with SIGINT ignored; `kill -INT` must still stop the run."""
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "dpo_cli", *map(str, _train_args(untrained_tiny, out, 400))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    while run.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "by SIGINT; checkpoint saved" in _one_error_line(stderr)
