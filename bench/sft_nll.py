"""Does `dpo-cli sft` lower the held-out negative log-likelihood? stories260K on stories-happy's chosen completions.

Runs `dpo-cli sft` as a user would (a subprocess, the train split's chosen completions, preferred-FT), then scores the
test split's chosen completions with the SFT objective's own evaluation (`SftObjective.evaluate`: mean NLL per
completion token, perplexity, token accuracy), once with the adapter and once with it switched off (the base).

Run:
    python bench/sft_nll.py                          # 4-bit stories260K, 120 steps of 8 examples, lr 5e-4
    python bench/sft_nll.py --steps 60 --lr 1e-3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from train_inputs import SHARED, STORIES_MODEL  # noqa: E402

STORIES = SHARED / "data" / "stories-happy"


def held_out_nll(adapter: Path, test_file: Path, max_length: int) -> dict[str, dict[str, float]]:
    """{"base": metrics, "sft": metrics} of the test file's chosen completions."""
    from datasets import Dataset

    from dpo_cli.data.records import ReadOptions, ReadResult, iter_file_pairs
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.model.adapter import load_base_tokenizer, load_policy, open_adapter
    from dpo_cli.sft.objective import SftObjective

    trained = open_adapter(adapter)
    tokenizer = load_base_tokenizer(trained)
    model = load_policy(trained)
    examples, _ = tokenize_pairs(
        tokenizer, iter_file_pairs(test_file, ReadOptions(kind="sft"), ReadResult()), max_length
    )
    rows = Dataset.from_list([{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids} for e in examples])
    objective = SftObjective()
    pad = tokenizer.pad_token_id
    sft = objective.evaluate(model, rows, pad, 16, "padded")
    with model.disable_adapter():
        base = objective.evaluate(model, rows, pad, 16, "padded")
    return {"base": base, "sft": sft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output-dir", type=Path, help="the SFT run folder (default: a temp folder)")
    args = parser.parse_args()
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="dpo-sft-nll-")) / "sft"
    command = [
        sys.executable, "-m", "dpo_cli", "sft", "--model", str(STORIES_MODEL), "--data", str(STORIES / "train.jsonl"),
        "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--max-length", str(args.max_length),
    ]  # fmt: skip
    print("$", " ".join(command[2:]).replace("dpo_cli", "dpo-cli", 1))
    subprocess.run(command, check=True, cwd=REPO)
    scores = held_out_nll(out, STORIES / "test.jsonl", args.max_length)
    base, sft = scores["base"], scores["sft"]
    print(
        f"\nheld-out: {sft['num_examples']} chosen completions of {STORIES / 'test.jsonl'}, {sft['num_tokens']} tokens"
    )
    for name, metrics in (("base (adapter off)", base), ("after dpo-cli sft", sft)):
        print(
            f"  {name:20s} NLL/token {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
            f"token accuracy {metrics['mean_token_accuracy']:.3f}"
        )
    drop = base["loss"] - sft["loss"]
    print(f"  NLL/token lowered by {drop:.4f} nats ({100 * drop / base['loss']:.1f}%), perplexity "
          f"{base['perplexity']:.3f} -> {sft['perplexity']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
