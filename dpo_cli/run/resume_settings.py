"""What a checkpoint depends on, and which recipe changes a `--resume` can take.

A checkpoint is the state of one run: its optimizer moments belong to one LoRA shape on one model, and its data
position (micro-batches done) means something only for the same pairs, batch size, accumulation and seed. Those
settings are *fixed*: a resumed run that changes one is refused in one line naming it, with the old and new value,
before any model is loaded. The schedule and cadence are *changeable*: the resumed run applies the new value from
its first step and says so. Settings in neither list (device, gradient checkpointing, eval files, cache folder,
...) do not change what the steps compute, or only where things go, and are not checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from dpo_cli.config import Recipe, reference_adapter_of
from dpo_cli.errors import UserError, shown
from dpo_cli.model.reference_adapter import adapter_content_sha256

REFERENCE_SETTING = "reference"
"""The fixed setting of what the reference policy is: [[adapter path, content hash]], or [] for the bare base; by
content, so `model.reference_adapter` unset and set to the same adapter as model.from_adapter are the same setting.
A checkpoint saved before it existed is not checked on it (its model.from_adapter was the reference)."""

FIXED = {
    "model": ("path", "quantize", "compute_dtype", "from_adapter"),
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "data": ("train", "max_length", "format", "columns", "chat_template", "eval_split"),
    "training": ("batch_size", "grad_accum", "seed", "max_tokens_per_batch", "objective"),
    "dpo": tuple(f.name for f in dataclasses.fields(Recipe().dpo) if f.name != "precompute_ref"),
    "sft": ("loss_on_prompt",),
}
"""Settings the saved optimizer state and data position only fit unchanged (precompute_ref only changes when the
reference log-probs are computed, not their values)."""
CHANGEABLE = {
    "training": (
        "lr",
        "scheduler",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "max_steps",
        "epochs",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "eval_batch_size",
        "sharding",
    ),
    "dpo": ("precompute_ref",),
}
"""Settings a resumed run applies as stated: the learning-rate schedule (recomputed for the step reached), when to
stop, save and evaluate, whether the reference is precomputed (the same values, to float rounding), and how the model
is spread over the processes (a checkpoint holds the whole adapter and optimizer state, whatever the sharding)."""
TRAIN_PAIRS = "train pairs"
WORLD_SIZE = "world size"
"""Changeable too: the processes a run trains with (torchrun). The data position counts micro-batches of one
process's size, so a resumed run with another number of processes reads on from the same pair; its global batch
(batch x grad_accum x processes) is the new one, printed at start."""


CONTENT_KEYS = ("data.train", "data.chat_template", "model.from_adapter", REFERENCE_SETTING)
"""Fixed settings compared by content (a sha256), not by path: the same file moved is the same setting."""


def _adapter_content(path: str) -> list[list[str | None]]:
    """[[path, content hash]] of a --from-adapter folder (config and weights), [] when none is set; the adapter
    itself was checked before this is called (run/setup.py)."""
    if not path:
        return []
    try:
        return [[path, adapter_content_sha256(Path(path))]]
    except OSError:
        return [[path, None]]


def _file_contents(paths: list[str]) -> list[list[str | None]]:
    """(path, content hash) of each file; None for one that cannot be read (reading it later says why)."""
    from dpo_cli.data.cache import file_fingerprint

    contents = []
    for path in paths:
        try:
            contents.append([path, file_fingerprint(Path(path))])
        except (OSError, UserError):  # reading the data says why, with the file's place
            contents.append([path, None])
    return contents


def _chat_template_contents(spec: str) -> list[list[str | None]]:
    """(name or path, hash of the template's text): a built-in template that changed between versions is a changed
    setting, as an edited template file is; none for the model's own (model.path covers it)."""
    from dpo_cli.data.templates import BUILTIN_NAMES, TOKENIZER, builtin_template_text

    if not spec or spec == TOKENIZER:
        return []
    if spec in BUILTIN_NAMES:
        return [[spec, hashlib.blake2b(builtin_template_text(spec).encode(), digest_size=16).hexdigest()]]
    return _file_contents([spec])


def _local_path(path: str) -> str:
    """A model folder by its absolute path, so `./m` and `/abs/m` are the same model; hub ids as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _values(recipe: Recipe, keys: dict[str, tuple[str, ...]]) -> dict:
    values = {}
    for section, names in keys.items():
        for name in names:
            values[f"{section}.{name}"] = getattr(getattr(recipe, section), name)
    return values


def fixed_settings(recipe: Recipe) -> dict:
    values = _values(recipe, FIXED)
    values["model.path"] = _local_path(recipe.model.path)
    values["data.train"] = _file_contents(recipe.data.train)
    values["data.chat_template"] = _chat_template_contents(recipe.data.chat_template)
    values["model.from_adapter"] = _adapter_content(recipe.model.from_adapter)
    values[REFERENCE_SETTING] = _adapter_content(reference_adapter_of(recipe.model))
    return values


def changeable_settings(recipe: Recipe) -> dict:
    return _values(recipe, CHANGEABLE)


def _describe(key: str, value) -> str:
    if key in CONTENT_KEYS:
        files = [f"{path} [content {digest[:8] if digest else 'unreadable'}]" for path, digest in value]
        return ", ".join(files) or ("the bare base" if key == REFERENCE_SETTING else "none")
    return repr(value)


def _same(key: str, saved, now) -> bool:
    if key in CONTENT_KEYS:
        saved_digests, now_digests = [d for _, d in saved], [d for _, d in now]
        if None in now_digests:
            return True  # a file that cannot be read is reported by the data reader, in its own words
        return saved_digests == now_digests
    if isinstance(saved, list) or isinstance(now, list):
        return list(saved or []) == list(now or [])
    return saved == now


def refuse_changed_fixed_settings(checkpoint: Path, saved: dict, now: dict) -> None:
    """One line naming every fixed setting that differs from the checkpoint's, if any."""
    changed = [key for key in now if key in saved and not _same(key, saved[key], now[key])]
    if not changed:
        return
    details = "; ".join(f"{key} was {_describe(key, saved[key])}, now {_describe(key, now[key])}" for key in changed)
    raise UserError(
        f"{checkpoint}: cannot resume with changed settings ({details}); these must stay as they were when the "
        "checkpoint was saved: rerun with the old values, or start a new run in another --output-dir"
    )


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'key old -> new' for each changeable setting the resumed run changes."""
    return [f"{key} {shown(saved[key])} -> {shown(now[key])}" for key in now if key in saved and saved[key] != now[key]]
