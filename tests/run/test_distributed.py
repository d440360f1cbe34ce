"""`dpo-cli train` under `torchrun --nproc-per-node 2` (CPU, gloo) on 4-bit stories260K, against one process.

Each torchrun launch costs 10-20 s of start-up on a small machine, so one launch (`two_process_runs`) runs several
train commands one after another (tests/run/ddp_driver.py), and the tests read what they left: metrics, adapters,
and per rank, after every step, a hash of the adapter and the pairs the rank trained on. The failure tests need a
launch each (the job ends).

Tolerance: a 2-process run is compared with a 1-process run of the same global batch (batch 2 x grad_accum 2 x 2
processes against batch 2 x grad_accum 4). Each process's gradient is its pairs' loss sum scaled by
world_size / pairs_in_step, and gloo averages the two, so the sums are taken in another order than in one process:
losses agree to 1e-5 (once bitwise equal; since 2026-12-03 runs on this VM, the base commit's too, differ by about
1e-7 relative, e.g. logps/chosen -100.25155830 against -100.25154781). The adapters are compared to 1e-4: AdamW
divides each update by the root of its second moment, so a rounding difference in a near-zero gradient element can
move that element by up to the learning rate (2e-3 here); 1.02e-5 was seen on one of 1,024 elements. The two ranks'
adapters are compared exactly: after the all-reduce both hold the same gradient and take the same optimizer step.

Every run here keeps the default gradient checkpointing (non-reentrant) on, so it is checked under DDP too, with
`no_sync` on the first of each rank's two micro-batches. Measured on a 2-core machine: a launch takes 11-15 s, and a
failing rank ends the job about 2-3 s after it fails (the tests allow 10).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.run.ddp_driver import BAD_RECORD

DRIVER = REPO / "tests" / "run" / "ddp_driver.py"
TOLERANCE = 1e-5
ADAPTER_TOLERANCE = 1e-4  # see the module docstring: AdamW's normalised update amplifies rounding
PROCESSES = 2


def _train_args(model: Path, data: Path, out: Path, steps: int, *extra) -> list[str]:
    args = ["--model", model, "--data", data, "--output-dir", out, "--max-steps", steps, "--batch-size", 2]
    args += ["--lr", "2e-3", "--max-length", 96, "--set", "training.save_steps=1", *extra]
    return [str(arg) for arg in args]


def _single_process(*args: str, command: str = "train") -> str:
    """`dpo-cli COMMAND ARGS` as one process, in this one; its output."""
    from typer.testing import CliRunner

    from dpo_cli.cli import app

    result = CliRunner().invoke(app, [command, *args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def _torchrun(tmp: Path, jobs: list[dict]) -> subprocess.Popen:
    """Starts the driver under torchrun on `jobs`; --standalone picks a free port (other tests may run at once)."""
    spec = tmp / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}"]
    return subprocess.Popen(
        [*command, str(DRIVER), str(spec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the torchrun job did not end within {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def _log(log: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{log}.rank{rank}").read_text().splitlines()]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _train_records(out: Path) -> list[dict]:
    return [r for r in _records(out) if "loss" in r]


def _stream_pairs(out: Path, steps: int, micro_batches_per_step: int) -> list[list[int]]:
    """The pairs of micro-batches [0, steps * micro_batches_per_step) of the run's data stream, in order."""
    from dpo_cli.config import load_recipe
    from dpo_cli.run.setup import DataStream

    recipe = load_recipe(out / "recipe.yaml")
    stream = DataStream(468, recipe.training.batch_size, recipe.training.seed)  # stories-happy: 468 train pairs
    return [stream.indices(m) for m in range(steps * micro_batches_per_step)]


def _budget_options(stories_data, grad_accum: int) -> list[str]:
    """Token-budget batches, reference log-probs computed before training, and evaluation at step 2 and the end."""
    options = ["--max-tokens-per-batch", 400, "--grad-accum", grad_accum, "--eval-data", stories_data["test"]]
    options += ["--set", "dpo.precompute_ref=true", "--set", "training.eval_steps=2"]
    return [str(option) for option in options]


@pytest.fixture(scope="module")
def two_process_runs(stories_model, stories_data, tmp_path_factory):
    """One torchrun launch, five commands: `ddp` (3 steps, batch 2 x grad_accum 2 x 2 processes), the same
    with the policy pass bypassing the DDP wrapper, `resumed` (a 1-process run of 2 steps, resumed on 2 processes
    to step 4), `budget` (token-budget batches, precomputed reference, evaluation) and `sft` (`dpo-cli sft`, as
    `ddp`, with evaluation); beside them `single`, `budget-single` and `sft-single`, the 1-process runs with the
    same global batches."""
    tmp = tmp_path_factory.mktemp("ddp")
    data, model = stories_data["train"], stories_model
    single_out = _single_process(*_train_args(model, data, tmp / "single", 3, "--grad-accum", 4))
    _single_process(*_train_args(model, data, tmp / "resumed", 2, "--grad-accum", 2))
    _single_process(*_train_args(model, data, tmp / "budget-single", 2, *_budget_options(stories_data, 2)))
    sft_eval = ["--eval-data", str(stories_data["test"])]
    _single_process(*_train_args(model, data, tmp / "sft-single", 3, "--grad-accum", 4, *sft_eval), command="sft")
    jobs = [
        {"args": _train_args(model, data, tmp / "ddp", 3, "--grad-accum", 2), "log": str(tmp / "ddp.log")},
        {
            "args": _train_args(model, data, tmp / "bypass", 2, "--grad-accum", 2),
            "log": str(tmp / "bypass.log"),
            "bypass_wrapper": True,
        },
        {
            "args": _train_args(model, data, tmp / "resumed", 4, "--grad-accum", 2, "--resume"),
            "log": str(tmp / "resumed.log"),
        },
        {
            "args": _train_args(model, data, tmp / "budget", 2, *_budget_options(stories_data, 1)),
            "log": str(tmp / "budget.log"),
        },
        {
            "args": _train_args(model, data, tmp / "sft", 3, "--grad-accum", 2, *sft_eval),
            "log": str(tmp / "sft.log"),
            "command": "sft",
        },
    ]
    code, output = _finish(_torchrun(tmp, jobs), timeout=300)
    assert code == 0, output[-3000:]
    return {"tmp": tmp, "output": output, "single_output": single_out}


def test_two_processes_train_exactly_as_one_with_the_same_global_batch(two_process_runs):
    tmp = two_process_runs["tmp"]
    ddp, single = _train_records(tmp / "ddp"), _train_records(tmp / "single")
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], abs=TOLERANCE), key
    # a sum of ~100 float32 token log-probs (about -100): 1e-5 absolute is below its rounding (1.05e-5 seen here)
    logps = [r["logps/chosen"] for r in ddp]
    assert logps == pytest.approx([r["logps/chosen"] for r in single], rel=TOLERANCE), "logps/chosen"
    assert [r["num_tokens"] for r in ddp] == [r["num_tokens"] for r in single], "tokens are summed over ranks"
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single]
    assert ddp[1]["loss"] != ddp[0]["loss"], "the adapter learned: the comparison is not of two untrained runs"
    adapter, expected = (
        load_file(str(tmp / "ddp" / "adapter_model.safetensors")),
        load_file(str(tmp / "single" / "adapter_model.safetensors")),
    )
    assert adapter.keys() == expected.keys()
    for key, value in adapter.items():
        torch.testing.assert_close(value, expected[key], atol=ADAPTER_TOLERANCE, rtol=0)


def test_sft_on_two_processes_trains_and_evaluates_exactly_as_one(two_process_runs):
    """SFT's loss is a mean over every trained token of the step, all processes': the same as one process's."""
    tmp = two_process_runs["tmp"]
    single, ddp = _records(tmp / "sft-single"), _records(tmp / "sft")
    assert [r["step"] for r in ddp] == [1, 2, 3, 3]  # three steps, then the final evaluation
    for one, two in zip(single, ddp, strict=True):
        for key in ("loss", "mean_token_accuracy", "grad_norm", "eval_loss", "eval_perplexity", "eval_num_tokens"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=TOLERANCE), (one["step"], key)
    logs = [_log(tmp / "sft.log", rank) for rank in range(PROCESSES)]
    assert [e["adapter"] for e in logs[0]] == [e["adapter"] for e in logs[1]], "both ranks take the same steps"
    two_processes = load_file(tmp / "sft" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp / "sft-single" / "adapter_model.safetensors").items():
        torch.testing.assert_close(two_processes[name], tensor, rtol=0, atol=TOLERANCE)


def test_token_budget_batches_precomputed_reference_and_evaluation_match_one_process(two_process_runs):
    tmp = two_process_runs["tmp"]
    ddp, single = _records(tmp / "budget"), _records(tmp / "budget-single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 2], "steps 1 and 2, then the final eval"
    for record, expected in zip(ddp, single, strict=True):
        assert record.keys() == expected.keys()
        for key in ("loss", "grad_norm", "eval_loss", "eval_rewards/accuracies", "eval_num_pairs"):
            if key in expected:
                assert record[key] == pytest.approx(expected[key], abs=TOLERANCE), key
    assert ddp[-1]["eval_num_pairs"] == 117, "every eval pair counted once (each rank scores every second one)"
    ranks = [_log(tmp / "budget.log", rank) for rank in range(PROCESSES)]
    assert [e["adapter"] for e in ranks[0]] == [e["adapter"] for e in ranks[1]]


def test_both_ranks_hold_the_same_adapter_after_every_step_and_share_each_step(two_process_runs):
    tmp = two_process_runs["tmp"]
    ranks = [_log(tmp / "ddp.log", rank) for rank in range(PROCESSES)]
    assert [e["adapter"] for e in ranks[0]] == [e["adapter"] for e in ranks[1]], "the ranks' adapters diverged"
    assert len({e["adapter"] for e in ranks[0]}) == 4, "the adapter changes at each of the 3 steps"
    # Step k takes the stream's micro-batches [4k, 4k + 4); rank r every second one from 4k + r: together the same
    # pairs as the 1-process run's step, each pair once.
    stream = _stream_pairs(tmp / "ddp", 3, 4)
    for step in range(3):
        for rank in range(PROCESSES):
            assert ranks[rank][step + 1]["pairs"] == [stream[4 * step + rank], stream[4 * step + rank + 2]]


def test_a_forward_that_bypassed_the_ddp_wrapper_would_fail_the_test_above(two_process_runs):
    """The trap: scoring calls the backbone and head directly; without the wrapper, gradients stay per rank."""
    tmp = two_process_runs["tmp"]
    ranks = [_log(tmp / "bypass.log", rank) for rank in range(PROCESSES)]
    assert ranks[0][0]["adapter"] == ranks[1][0]["adapter"], "both start from the same adapter"
    assert ranks[0][1]["adapter"] != ranks[1][1]["adapter"], "un-reduced gradients: each rank its own adapter"


def test_only_the_main_process_writes_and_speaks(two_process_runs):
    tmp, output = two_process_runs["tmp"], two_process_runs["output"]
    out = tmp / "ddp"
    assert [r["step"] for r in _records(out)] == [1, 2, 3], "one line per step, not one per rank"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not [p.name for p in out.rglob("*.tmp")], "no temporary left behind"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    # Five commands ran, each on two processes: each line once per command, from the main process.
    assert output.count("trainable LoRA parameters") == 5 and output.count("done: 3 steps") == 2  # ddp and sft
    assert output.count("global batch: 2 pairs x grad_accum 2 x 2 processes = 8 pairs per optimizer step") == 3
    assert "global batch: up to 400 tokens x grad_accum 1 x 2 processes per optimizer step" in output
    state = json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["micro_batches_done"] == 12 and state["changeable_settings"]["world size"] == 2
    assert "global batch: 2 pairs x grad_accum 4 x 1 process = 8 pairs" in two_process_runs["single_output"]


def test_a_one_process_run_resumes_on_two(two_process_runs):
    tmp, output = two_process_runs["tmp"], two_process_runs["output"]
    out = tmp / "resumed"
    assert "resuming from" in output and "world size 1 -> 2" in output
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    ranks = [_log(tmp / "resumed.log", rank) for rank in range(PROCESSES)]
    assert ranks[0][0] | {"start": True} == ranks[1][0] and ranks[0][0]["step"] == 2
    assert [e["adapter"] for e in ranks[0]] == [e["adapter"] for e in ranks[1]]
    # Steps 1-2 (one process, grad_accum 2) read micro-batches 0-3; steps 3-4 on two processes read on from 4.
    stream = _stream_pairs(out, 4, 4)
    assert ranks[0][1]["pairs"] == [stream[4], stream[6]] and ranks[1][1]["pairs"] == [stream[5], stream[7]]
    assert ranks[0][2]["pairs"] == [stream[8], stream[10]] and ranks[1][2]["pairs"] == [stream[9], stream[11]]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["micro_batches_done"] == 2 * 2 + 2 * 4


def test_a_two_process_run_resumes_on_one(two_process_runs, stories_model, stories_data, tmp_path):
    out = tmp_path / "copy"  # a copy: the other tests read the 2-process run as it ended
    shutil.copytree(two_process_runs["tmp"] / "ddp", out)
    stdout = _single_process(*_train_args(stories_model, stories_data["train"], out, 4, "--grad-accum", 2, "--resume"))
    assert "world size 2 -> 1" in stdout
    assert "global batch: 2 pairs x grad_accum 2 x 1 process = 4 pairs per optimizer step" in stdout
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["micro_batches_done"] == 3 * 4 + 2, "step 4 read on from micro-batch 12, two of them"
    assert state["changeable_settings"]["world size"] == 1


def _failing_job(tmp: Path, model: Path, data: Path, kind: str) -> dict:
    out = tmp / kind
    return {
        "args": _train_args(model, data, out, 6, "--grad-accum", 1),
        "log": str(tmp / f"{kind}.log"),
        "fail": {"rank": 1, "step": 3, "kind": kind},
    }


def _seconds_after_failure(tmp: Path, kind: str, ended: float) -> float:
    failing = [e for e in _log(tmp / f"{kind}.log", 1) if "failing" in e]
    assert failing, "rank 1 reached the failing step"
    return ended - failing[0]["time"]


def test_a_bad_record_on_one_rank_ends_the_job_within_seconds_with_its_message(stories_model, stories_data, tmp_path):
    process = _torchrun(tmp_path, [_failing_job(tmp_path, stories_model, stories_data["train"], "user_error")])
    code, output = _finish(process, timeout=120)
    ended = time.time()
    assert code != 0
    assert f"error: {BAD_RECORD}" in output, output[-3000:]
    # Rank 0 says in one line why it stopped: its collective failed when rank 1 left, or, on a loaded machine where
    # torchrun's SIGTERM reaches it first (seen: 3 runs of 3 under a parallel test suite), that it was interrupted.
    peer_said_why = "error: rank 0: another process of this 2-process job stopped" in output or (
        "interrupted at step" in output and "by SIGTERM" in output
    )
    assert peer_said_why, output[-3000:]  # the job's output, to tell a slow peer from a different message
    assert "dpo_cli/" not in output, "no traceback from dpo-cli (torchrun prints its own summary)"
    assert _seconds_after_failure(tmp_path, "user_error", ended) < 10, output[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "user_error" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002"], output[-3000:]


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(stories_model, stories_data, tmp_path):
    process = _torchrun(tmp_path, [_failing_job(tmp_path, stories_model, stories_data["train"], "nan")])
    code, output = _finish(process, timeout=120)
    ended = time.time()
    assert code != 0
    assert output.count("error: step 3: the loss is nan; training stopped, the last good checkpoint is kept") == 2
    assert "exitcode  : 3" in output, "the divergence exit code"
    assert _seconds_after_failure(tmp_path, "nan", ended) < 10
    records = _records(tmp_path / "nan")
    assert [r["step"] for r in records] == [1, 2]


def test_sigterm_on_the_launcher_leaves_a_checkpoint_of_the_last_step(stories_model, stories_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = _train_args(stories_model, stories_data["train"], out, 500, "--grad-accum", 1)
    args += ["--set", "training.save_steps=0"]
    process = _torchrun(tmp_path, [{"args": args, "log": str(log)}])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if Path(f"{log}.rank0").is_file() and len(_log(log, 0)) >= 3:
            break
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, output = _finish(process, timeout=60)
    assert time.monotonic() - sent < 15, "the job ended within seconds"
    assert code != 0 and "interrupted at step" in output, output[-3000:]
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] >= 2 and state["micro_batches_done"] == 2 * state["step"], "the last complete step"
    assert [r["step"] for r in _records(out)] == list(range(1, state["step"] + 1))


# Without torchrun: the helpers each rank runs, with the launcher's variables set by hand -------------------------


def test_a_single_process_starts_no_process_group_and_changes_nothing(monkeypatch):
    from dpo_cli.run import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.start(torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    assert distributed.sum_over_ranks([1.5, float("nan")])[0] == 1.5
    assert distributed.average_metrics({"loss": 3.0}, 4) == {"loss": 0.75}
    assert distributed.my_micro_batches(10, 3) == [10, 11, 12]
    with distributed.main_process_first():
        pass
    distributed.barrier()


def test_each_rank_takes_every_world_size_th_micro_batch_of_a_step(monkeypatch):
    from dpo_cli.run import distributed

    monkeypatch.setenv("WORLD_SIZE", "3")
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(distributed.my_micro_batches(12, 2))
    assert shares == [[12, 15], [13, 16], [14, 17]]
    assert sorted(sum(shares, [])) == list(range(12, 18)), "the step's 6 micro-batches, each taken once"


def test_epochs_give_the_steps_of_this_world_size_from_where_a_resumed_run_stands(monkeypatch):
    from dpo_cli.config import Recipe
    from dpo_cli.run.checkpoint import TrainerState
    from dpo_cli.run.setup import DataStream, global_batch, total_steps

    recipe = Recipe()
    recipe.training.batch_size, recipe.training.grad_accum, recipe.training.epochs = 4, 2, 1
    stream = DataStream(num_pairs=100, batch_size=4, seed=0)  # 25 micro-batches an epoch
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert total_steps(recipe, stream) == 7  # ceil(25 / (2 * 2))
    assert "4 pairs x grad_accum 2 x 2 processes = 16 pairs per optimizer step" in global_batch(recipe)
    # 3 steps on one process read 6 micro-batches; the 19 left take ceil(19 / 4) = 5 steps on two.
    assert total_steps(recipe, stream, TrainerState(step=3, micro_batches_done=6, total_steps=13)) == 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert total_steps(recipe, stream) == 13
