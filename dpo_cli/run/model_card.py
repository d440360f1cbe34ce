"""The model card: the `README.md` of a run folder, in the Hugging Face convention, so a pushed folder explains itself.

A YAML header the Hub reads (`base_model`, `library_name: peft`, `tags`, `datasets` by file name), then what a reader
needs to trust or repeat the run: the command, the recipe's key settings, the data's fingerprints and pair counts,
the final train and eval metrics, and the report figure. Everything comes from the folder (`recipe.yaml`,
`metrics.jsonl`, `train_summary.txt`) and from the data files the recipe names.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dpo_cli.config import RECIPE_FILENAME, REFERENCE_COPY, REFERENCE_IS_BASE, read_recipe_file
from dpo_cli.data.cache import file_fingerprint
from dpo_cli.files import write_text_atomic
from dpo_cli.run.report import REPORT_FILE
from dpo_cli.run.run_folder import METRICS_FILE, read_metrics

CARD_FILE = "README.md"
SUMMARY_FILE = "train_summary.txt"
CARD_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)
SFT_CARD_METRICS = ("loss", "mean_token_accuracy", "perplexity")
KEY_SETTINGS = (
    ("model", "quantize"),
    ("lora", "r"),
    ("lora", "alpha"),
    ("lora", "dropout"),
    ("lora", "target_modules"),
    ("dpo", "loss_type"),
    ("dpo", "beta"),
    ("sft", "loss_on_prompt"),
    ("training", "max_steps"),
    ("training", "epochs"),
    ("training", "batch_size"),
    ("training", "grad_accum"),
    ("training", "lr"),
    ("training", "scheduler"),
    ("training", "warmup_ratio"),
    ("training", "seed"),
    ("data", "max_length"),
)


def front_matter(recipe: dict) -> dict:
    model, data = recipe.get("model") or {}, recipe.get("data") or {}
    files = [*(data.get("train") or []), *(data.get("eval") or [])]
    return {
        "base_model": str(model.get("path", "")),
        "library_name": "peft",
        "tags": [_objective(recipe), "qlora" if model.get("quantize", True) else "lora", "dpo-cli"],
        "datasets": list(dict.fromkeys(Path(f).name for f in files)),
        "pipeline_tag": "text-generation",
    }


def _summary_counts(folder: Path) -> dict[str, str]:
    """`key: value` lines of train_summary.txt (pairs used, dropped, truncated), if the run wrote it."""
    path = folder / SUMMARY_FILE
    if not path.exists():
        return {}
    pairs = (line.split(":", 1) for line in path.read_text(encoding="utf-8").splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _fingerprint(path: str) -> str:
    try:
        return file_fingerprint(Path(path))
    except OSError:
        return "(not readable now)"


def _settings_table(recipe: dict) -> list[str]:
    lines = ["| setting | value |", "| --- | --- |"]
    other_objective = "dpo" if _objective(recipe) == "sft" else "sft"  # its settings did not apply
    for section, key in KEY_SETTINGS:
        if section == other_objective:
            continue
        value = (recipe.get(section) or {}).get(key)
        if value is not None:
            shown = (
                ", ".join(map(str, value))
                if isinstance(value, list)
                else str(value).lower()
                if isinstance(value, bool)
                else value
            )
            lines.append(f"| `{section}.{key}` | `{shown}` |")
    return lines


def _data_table(recipe: dict, counts: dict[str, str], eval_pairs: float | None) -> list[str]:
    data = recipe.get("data") or {}
    lines = ["| split | file | blake2b-128 of the file |", "| --- | --- | --- |"]
    for split in ("train", "eval"):
        lines += [f"| {split} | `{f}` | `{_fingerprint(f)}` |" for f in data.get(split) or []]
    lines.append("")
    used = [f"train {counts['pairs']} pairs"] if "pairs" in counts else []
    if eval_pairs is not None:
        split = f" (held out: data.eval_split {data['eval_split']})" if data.get("eval_split") else ""
        used.append(f"eval {int(eval_pairs)} pairs{split}")
    if used:
        lines.append("Pairs used: " + ", ".join(used) + ".")
    extra = [f"{key} {counts[key]}" for key in ("dropped (prompt fills max_length)", "truncated completions")]
    if all(key in counts for key in ("dropped (prompt fills max_length)", "truncated completions")):
        lines.append("Set aside or cut at `max_length`: " + ", ".join(extra) + ".")
    return lines


def _objective(recipe: dict) -> str:
    """dpo or sft: what the run trained (recipes from before `training.objective` are DPO's)."""
    return (recipe.get("training") or {}).get("objective", "dpo")


def _sft_text(recipe: dict, base_model: str, steps: int) -> tuple[str, str]:
    """(what the adapter is, how to read its metrics) for an SFT run."""
    trained = "every token" if (recipe.get("sft") or {}).get("loss_on_prompt") else "the completion tokens"
    return (
        f"A LoRA adapter for `{base_model}`, supervised fine-tuned (SFT) on {trained} for {steps} steps by dpo-cli. "
        "`dpo-cli train --from-adapter THIS_FOLDER` starts DPO from it, with it as the reference.",
        "Loss is the mean negative log-likelihood per trained token; accuracy the share of trained tokens that are "
        "the model's top-1 prediction; perplexity exp(eval loss).",
    )


def _metrics_table(records: list[dict], names: tuple[str, ...] = CARD_METRICS) -> list[str]:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    last_train, last_eval = (train[-1] if train else {}), (evals[-1] if evals else {})
    lines = ["| metric | train (last step) | eval (final) |", "| --- | ---: | ---: |"]
    for name in names:
        cells = [
            f"{row[key]:.4f}" if isinstance(row.get(key), int | float) else "-"  # null: not a finite number
            for row, key in ((last_train, name), (last_eval, f"eval_{name}"))
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def _reference_sentence(recipe: dict) -> str:
    model = recipe.get("model") or {}
    start, reference = model.get("from_adapter"), model.get("reference_adapter")
    if reference == REFERENCE_IS_BASE or (not start and not reference):
        started = f" The run started from the adapter `{start}` (`model.from_adapter`)." if start else ""
        return f"The reference policy was the bare base (every adapter switched off).{started}"
    if reference and reference != start:
        began = f"began as a copy of `{start}` (`model.from_adapter`)" if start else "began at the base"
        return (
            f"This adapter {began}; the reference policy was the base with the adapter `{reference}` "
            f"(`model.reference_adapter`), frozen (a copy is in `{REFERENCE_COPY}/` beside this file). This adapter "
            "holds the whole policy: base + this adapter is the aligned model."
        )
    return (
        f"The run started from the adapter `{start}` (`model.from_adapter`): this adapter began as a copy of it, and "
        f"the reference policy was the base with that adapter, frozen (a copy is in `{REFERENCE_COPY}/` beside this "
        "file). This adapter holds the whole policy: base + this adapter is the aligned model."
    )


def model_card(folder: Path, command: str | None = None) -> str:
    """The README.md text for a run folder written by `dpo-cli train`."""
    folder = Path(folder)
    recipe = read_recipe_file(folder / RECIPE_FILENAME)
    records = read_metrics(folder / METRICS_FILE) if (folder / METRICS_FILE).exists() else []
    header = front_matter(recipe)
    dpo = recipe.get("dpo") or {}
    steps = max((r["step"] for r in records if "loss" in r), default=0)
    evals = [r for r in records if "eval_num_pairs" in r or "eval_num_examples" in r]
    eval_count = (evals[-1].get("eval_num_pairs") or evals[-1].get("eval_num_examples")) if evals else None
    sft = _objective(recipe) == "sft"
    command_name = "sft" if sft else "train"
    intro = (
        f"A LoRA adapter for `{header['base_model']}`, aligned to preference data with DPO "
        f"(loss {' + '.join(dpo.get('loss_type') or ['sigmoid'])}, β {dpo.get('beta', 0.1)}) for {steps} steps by "
        f"dpo-cli. {_reference_sentence(recipe)}"
    )
    reading = "Rewards are β·log(πθ/πref) per completion; accuracy is the share of pairs whose chosen reward is higher."
    if sft:
        intro, reading = _sft_text(recipe, header["base_model"], steps)
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {folder.resolve().name}",
        "",
        intro,
        "",
        "## How it was made",
        "",
        "```bash",
        command or f"dpo-cli {command_name} {RECIPE_FILENAME}",
        "```",
        "",
        f"`{RECIPE_FILENAME}` beside this file is the fully resolved recipe: "
        f"`dpo-cli {command_name} {RECIPE_FILENAME}` repeats the run. Its key settings:",
        "",
        *_settings_table(recipe),
        "",
        "## Data",
        "",
        *_data_table(recipe, _summary_counts(folder), eval_count),
        "",
        "## Results",
        "",
        *_metrics_table(records, SFT_CARD_METRICS if sft else CARD_METRICS),
        "",
        f"{reading} Every step's metrics are in `{METRICS_FILE}` (TRL's names).",
        "",
        f"![training curves]({REPORT_FILE})",
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")  # this folder, or where it was pushed',
        "```",
        "",
        "Or fold the adapter into the base for plain Transformers: `dpo-cli merge-adapter --adapter THIS_FOLDER "
        "--output MERGED`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, command: str | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, model_card(folder, command))
    return path
