"""`dpo-cli sample`: N completions per prompt from the policy, scored by the rewards, paired for `train`.

    dpo-cli sample --model BASE [--adapter DIR] --prompts FILE --num-samples 4 --reward happy.py:score \
        --output-dir samples/

Writes into --output-dir:
- `candidates.jsonl`: every completion with its reward, whether it ended (EOS) and its prompt's number, appended
  one batch of prompts at a time (write, flush, fsync), so a kill loses at most the batch in flight;
- `pairs.jsonl`: the explicit prompt/chosen/rejected pairs `dpo-cli train` reads, and `summary.json`;
- `settings.json`: what the samples depend on. A rerun into the same folder with the same settings continues after
  the last complete prompt; pairing settings (`--pairing`, `--min-margin`, `--missing-eos-penalty`) may change
  between runs, since pairing is redone from candidates.jsonl every time.

Prompts are grouped into batches by token length once, from the whole list, and each sample draws from its own
seeded stream (`generation`), so a resumed run gives the very samples an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dpo_cli.config import recipe_from_dict
from dpo_cli.data.records import json_line
from dpo_cli.data.tokenize import chat_ids, use_chat_template
from dpo_cli.errors import UserError
from dpo_cli.files import fsync_folder, write_text_atomic
from dpo_cli.model.adapter import load_base_tokenizer, load_policy, open_adapter
from dpo_cli.model.load import load_base_model, load_tokenizer, resolve_device
from dpo_cli.online.generation import (
    SamplingSettings,
    context_length,
    generate_rows,
    sample_seed,
    token_limit,
)
from dpo_cli.online.pairing import PairingCounts, pair_samples
from dpo_cli.online.prompts import Prompt, prompts_fingerprint, read_prompts
from dpo_cli.online.rewards import RewardSet, load_rewards
from dpo_cli.online.sampling_options import SamplingOptions
from dpo_cli.output_folder import check_folder_is_ours, claimed_folder, is_within, local_folder

CANDIDATES = "candidates.jsonl"
PAIRS = "pairs.jsonl"
SUMMARY = "summary.json"
SETTINGS = "settings.json"
KIND = "sample"


@dataclasses.dataclass
class SampleOptions:
    prompts: list[Path]
    rewards: list[str]
    output_dir: Path
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    adapter: Path | None = None
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Recipe settings from the flags and --set: model.path, model.quantize, the data reading keys."""
    trust_remote_code: bool = False


def generation_settings(sampling: SamplingOptions) -> SamplingSettings:
    """What the samples themselves depend on (generation's part of the options)."""
    return SamplingSettings(
        sampling.num_samples, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed
    )


@dataclasses.dataclass
class SampleReport:
    output_dir: Path
    summary: dict
    resumed_prompts: int = 0
    """Prompts found complete in the folder and not sampled again."""


@dataclasses.dataclass
class Policy:
    """The model samples come from, its tokenizer, and what names it in settings.json."""

    model: object
    tokenizer: object
    names: dict


def load_sampling_policy(
    adapter: Path | None, overrides: dict, trust_remote_code: bool, console: Console | None
) -> Policy:
    """base + adapter (loaded as `eval` loads it), or the bare base model of --model."""
    if adapter is not None:
        opened = open_adapter(adapter, None, console, trust_remote_code, overrides)
        tokenizer = load_base_tokenizer(opened)
        return Policy(load_policy(opened), tokenizer, {"model": opened.base_path, "adapter": str(adapter)})
    recipe = recipe_from_dict(overrides)
    config = recipe.model
    tokenizer = load_tokenizer(config.path, trust_remote_code)
    model = load_base_model(config, resolve_device(config.device), trust_remote_code)
    model.eval()
    return Policy(model, tokenizer, {"model": config.path, "adapter": None})


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids as training tokenizes it: chat prompts rendered ready for the assistant's turn."""
    if prompt.is_chat:
        return chat_ids(tokenizer, prompt.text, add_generation_prompt=True)
    return list(tokenizer(prompt.text)["input_ids"])


def batch_plan(lengths: list[int], num_samples: int, batch_size: int) -> list[list[int]]:
    """Prompt numbers, grouped by token length (shortest first) into batches of about `batch_size` sequences.

    Fixed by the whole prompt list, so a resumed run meets the same batches; a batch is written whole or not at all.
    """
    per_batch = max(1, batch_size // num_samples)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + per_batch] for start in range(0, len(order), per_batch)]


def eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return {i for i in ids if i is not None}


def completion_text(tokenizer, prompt_tokens: list[int], completion_tokens: list[int], is_chat: bool) -> str:
    """The completion as text that continues the prompt's text: decoded with the prompt and cut after it, so a
    leading space a tokenizer folds into the first token (sentencepiece's '▁The') is kept; train re-tokenizes
    prompt + completion, and "kite.The" would not be what was sampled."""
    alone = tokenizer.decode(completion_tokens, skip_special_tokens=True)
    if is_chat:
        return alone  # the assistant's message content; the template supplies what separates it
    prompt_text = tokenizer.decode(prompt_tokens, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_tokens + completion_tokens, skip_special_tokens=True)
    return whole[len(prompt_text) :] if whole.startswith(prompt_text) else alone


def completion_value(prompt: Prompt, text: str):
    """A completion as reward functions and pairs see it: text, or one assistant message for chat prompts."""
    return [{"role": "assistant", "content": text}] if prompt.is_chat else text


def sample_prompts(
    policy: Policy,
    prompts: list[Prompt],
    numbers: list[int],
    ids: list[list[int]],
    settings: SamplingSettings,
    rewards: RewardSet,
) -> list[dict]:
    """Candidate rows of prompts `numbers` (one batch): settings.num_samples each, generated together, scored."""
    model, tokenizer = policy.model, policy.tokenizer
    context = context_length(model)
    rows_prompt = [n for n in numbers for _ in range(settings.num_samples)]
    rows_sample = [j for _ in numbers for j in range(settings.num_samples)]
    completions = generate_rows(
        model,
        [ids[n] for n in rows_prompt],
        [sample_seed(settings.seed, n, j) for n, j in zip(rows_prompt, rows_sample, strict=True)],
        [token_limit(len(ids[n]), settings.max_new_tokens, context) for n in rows_prompt],
        settings,
        tokenizer.pad_token_id,
        eos_ids(tokenizer, model),
    )
    rows_completions = zip(rows_prompt, completions, strict=True)
    texts = [completion_text(tokenizer, ids[n], c.token_ids, prompts[n].is_chat) for n, c in rows_completions]
    rows = []
    for offset, number in enumerate(numbers):
        prompt = prompts[number]
        span = slice(offset * settings.num_samples, (offset + 1) * settings.num_samples)
        values = [completion_value(prompt, text) for text in texts[span]]
        columns = {key: [value] * len(values) for key, value in prompt.columns.items()}
        combined, each = rewards.score([prompt.text] * len(values), values, columns, prompt.source)
        for j, (completion, value, reward, by_name) in enumerate(
            zip(completions[span], values, combined, each, strict=True)
        ):
            rows.append(
                {
                    "prompt_number": number,
                    "sample": j,
                    "source": prompt.source,
                    "prompt": prompt.text,
                    "completion": value,
                    "ended": completion.ended,
                    "tokens": len(completion.token_ids),
                    "reward": reward,
                    "rewards": by_name,
                }
            )
    return rows


# The folder: settings, candidates (resumable), pairs, summary ---------------------------------------------------


def check_settings(folder: Path, settings: dict) -> None:
    """A folder holding samples continues only under the settings that made them; else one line names the key."""
    path = folder / SETTINGS
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable; the folder is damaged, pick another --output-dir") from None
    for key, value in settings.items():
        if saved.get(key) != value:
            raise UserError(
                f"--output-dir {folder}: holds samples with {key}={saved.get(key)!r}, and this run asks for "
                f"{value!r}; rerun with the same settings to continue, or pick another folder"
            )


def read_candidates(path: Path, num_samples: int) -> list[dict]:
    """The rows of prompts with all their samples; a torn last line or a partial prompt (a kill) is cut off."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]
    rows = []
    for line in whole.split("\n"):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    counts: dict[int, int] = {}
    for row in rows:
        counts[row["prompt_number"]] = counts.get(row["prompt_number"], 0) + 1
    kept = [row for row in rows if counts[row["prompt_number"]] == num_samples]
    if len(kept) != len(rows) or len(whole) != len(text):
        write_text_atomic(path, "".join(json_line(row) + "\n" for row in kept))
    return kept


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write per batch, flushed to disk before the next batch starts."""
    data = "".join(json_line(row) + "\n" for row in rows).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def effective_reward(row: dict, missing_eos_penalty: float) -> float | None:
    """The reward pairing uses: TRL's missing_eos_penalty subtracted from a completion that did not end."""
    if row["reward"] is None:
        return None
    return row["reward"] - (0.0 if row["ended"] else missing_eos_penalty)


def pairs_from_candidates(
    rows: list[dict], pairing: str, min_margin: float, missing_eos_penalty: float, seed: int
) -> tuple[list[dict], PairingCounts]:
    """pairs.jsonl's records, in prompt order, and what pairing kept and dropped."""
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_number"], []).append(row)
    counts = PairingCounts()
    records = []
    for number in sorted(by_prompt):
        samples = sorted(by_prompt[number], key=lambda row: row["sample"])
        rewards = [effective_reward(row, missing_eos_penalty) for row in samples]
        found = pair_samples(rewards, pairing, min_margin, sample_seed(seed, number, -1))
        counts.add(found.counts)
        for chosen, rejected in found.pairs:
            records.append(
                {
                    "prompt": samples[0]["prompt"],
                    "chosen": samples[chosen]["completion"],
                    "rejected": samples[rejected]["completion"],
                    "source": samples[0]["source"],
                    "reward_chosen": rewards[chosen],
                    "reward_rejected": rewards[rejected],
                }
            )
    return records, counts


def summarize(rows: list[dict], counts: PairingCounts, prompts: int) -> dict:
    rewards = [row["reward"] for row in rows if row["reward"] is not None]
    return {
        "prompts": prompts,
        "samples": len(rows),
        "reward_mean": statistics.fmean(rewards) if rewards else None,
        "reward_std": statistics.pstdev(rewards) if rewards else None,
        "reward_min": min(rewards) if rewards else None,
        "reward_max": max(rewards) if rewards else None,
        "not_ended": sum(not row["ended"] for row in rows),
        **dataclasses.asdict(counts),
    }


def check_output_dir(options: SampleOptions, model_path: str) -> None:
    folder = options.output_dir
    check_folder_is_ours(folder, KIND, "--output-dir", "; or rerun into a folder of earlier `dpo-cli sample` output")
    taken = [(str(p), "a --prompts file") for p in options.prompts]
    taken += [(str(options.adapter), "the adapter folder")] if options.adapter else []
    taken += [(str(local_folder(model_path)), "the base model's folder")] if local_folder(model_path) else []
    for path, what in taken:
        if is_within(path, folder) or is_within(folder, path):
            raise UserError(f"--output-dir {folder}: overlaps {what} {path}; pick another folder")


def run_sample(options: SampleOptions, console: Console, rewards: RewardSet | None = None) -> SampleReport:
    """Sample, score, append, pair; `rewards` already loaded (iterate's) or loaded here from options.rewards."""
    sampling = options.sampling
    sampling.check()
    if rewards is None:
        rewards = load_rewards(
            options.rewards, sampling.reward_weights, options.trust_remote_code, sampling.reward_quantize
        )
    recipe = recipe_from_dict(options.overrides)
    check_output_dir(options, recipe.model.path)
    prompts = read_prompts([str(p) for p in options.prompts], recipe.data)
    policy = load_sampling_policy(options.adapter, options.overrides, options.trust_remote_code, console)
    if recipe.data.chat_template:
        use_chat_template(policy.tokenizer, recipe.data.chat_template)
    if prompts[0].is_chat and not getattr(policy.tokenizer, "chat_template", None):
        raise UserError(
            f"{prompts[0].source}: the prompts are conversations, and the tokenizer has no chat template to render "
            "them; pass --chat-template FILE.jinja"
        )
    ids = [prompt_ids(policy.tokenizer, prompt) for prompt in prompts]
    check_prompt_lengths(prompts, ids, context_length(policy.model))
    settings = {
        **policy.names,
        "prompts": prompts_fingerprint(prompts),
        "rewards": rewards.names,
        "reward_weights": rewards.weights,
        **dataclasses.asdict(generation_settings(sampling)),
        "batch_size": sampling.batch_size,
    }
    with claimed_folder(options.output_dir, KIND, "--output-dir") as folder:
        check_settings(folder, settings)
        write_text_atomic(folder / SETTINGS, json.dumps(settings, indent=2) + "\n")
        rows = read_candidates(folder / CANDIDATES, sampling.num_samples)
        done = {row["prompt_number"] for row in rows}
        plan = batch_plan([len(i) for i in ids], sampling.num_samples, sampling.batch_size)
        todo = [batch for batch in plan if not set(batch) <= done]
        with sampling_progress(console, len(prompts) * sampling.num_samples, len(done) * sampling.num_samples) as tick:
            for batch in todo:
                new_rows = sample_prompts(policy, prompts, batch, ids, generation_settings(sampling), rewards)
                append_rows(folder / CANDIDATES, new_rows)
                rows.extend(new_rows)
                tick(len(new_rows))
        fsync_folder(folder)
        report = write_pairs(folder, rows, sampling, len(prompts))
        report.resumed_prompts = len(done)
    return report


def write_pairs(folder: Path, rows: list[dict], sampling: SamplingOptions, prompts: int) -> SampleReport:
    pairs, counts = pairs_from_candidates(
        rows, sampling.pairing, sampling.min_margin, sampling.missing_eos_penalty, sampling.seed
    )
    summary = summarize(rows, counts, prompts)
    summary.update(
        pairing=sampling.pairing, min_margin=sampling.min_margin, missing_eos_penalty=sampling.missing_eos_penalty
    )
    write_text_atomic(folder / PAIRS, "".join(json_line(pair) + "\n" for pair in pairs))
    write_text_atomic(folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return SampleReport(folder, summary)


def check_prompt_lengths(prompts: list[Prompt], ids: list[list[int]], context: int | None) -> None:
    if context is None:
        return
    for prompt, prompt_tokens in zip(prompts, ids, strict=True):
        if len(prompt_tokens) >= context:
            raise UserError(
                f"{prompt.source}: the prompt is {len(prompt_tokens)} tokens, which fills the model's context of "
                f"{context} and leaves no room for a completion; shorten or remove it"
            )


class sampling_progress:
    """A progress bar over samples, with samples/s; yields the callback that advances it."""

    def __init__(self, console: Console, total: int, already: int):
        self.console, self.total, self.already = console, total, already

    def __enter__(self):
        columns = (
            TextColumn("[bold]sample"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=self.console)
        self.progress.__enter__()
        self.task = self.progress.add_task("sample", total=self.total, completed=self.already, rate="")
        self.started, self.count = time.perf_counter(), 0

        def tick(samples: int) -> None:
            self.count += samples
            rate = self.count / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=samples, rate=f"{rate:.1f} samples/s")

        return tick

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def print_summary(report: SampleReport, console: Console) -> None:
    summary = report.summary
    table = Table(title=f"samples in {report.output_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("prompts", "samples", "reward_mean", "reward_std", "reward_min", "reward_max", "not_ended"):
        value = summary[key]
        table.add_row(key, "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    table.add_row(f"pairs ({summary['pairing']})", f"{summary['pairs']:,}")
    table.add_row("ties dropped", f"{summary['ties']:,}")
    table.add_row(f"below --min-margin {summary['min_margin']}", f"{summary['below_margin']:,}")
    table.add_row("samples with no reward (None)", f"{summary['unscored']:,}")
    table.add_row("prompts with no usable pair", f"{summary['prompts_without_pair']:,}")
    console.print(table)
    if report.resumed_prompts:
        console.print(f"continued after {report.resumed_prompts} prompts sampled by an earlier run")
    console.print(f"pairs written to {report.output_dir / PAIRS}; every sample in {report.output_dir / CANDIDATES}")
