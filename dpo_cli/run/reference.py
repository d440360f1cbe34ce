"""Reference log-probs scored once and kept on disk (`dpo.precompute_ref`), like TRL's `precompute_ref_log_probs`.

The reference is the base model with the adapters disabled (or base + a frozen reference adapter), so it never
changes during training: scoring it once over a split's pairs saves one forward pass per step (of about four: the
policy's forward and backward). The values
are a (num_pairs, 2) float32 tensor of each pair's (chosen, rejected) log-probs as the losses see them (LD-weighted
when `dpo.ld_alpha` is set), kept beside the pairs as data rather than layout: a step hands its rows to
`score_batch(..., ref_logps=...)`, which then skips the reference pass.

They are kept in the data cache (`data.cache_dir`, see data/cache.py) as `reference/<fingerprint>/logps.safetensors`
(never a pickle), so every epoch, rerun, `--resume`, periodic eval and `dpo-cli eval` of the same inputs reads them
instead of running the reference. The fingerprint is everything the values depend on:
- the pairs' token ids: the prepared split's key (data bytes, reading settings, tokenizer, max_length) and the rows
  the split keeps of it (`SplitReport.pairs_key`);
- the base model: the sha256 of its config.json, weight files and code files. Hashing a multi-GB model on every run
  would cost seconds to minutes, so each file's hash is remembered in `<cache root>/weight-hashes.json` by (resolved
  path, size, modification time in ns); a file rewritten in place with the same size and time would be missed;
- how it is loaded: 4-bit or not, the quantization config (quant type, double quantization, compute dtype) and the
  compute dtype;
- the reference adapter, in a run started from one (`train --from-adapter`, model/reference_adapter.py): the sha256
  of its config and weights, so another adapter (or the same one retrained in place) never reads these values;
- `dpo.ld_alpha`, the only loss setting that changes the stored values: every loss reads the reference as these
  per-sequence sums (dpo/scoring.py `_reference_pair`); reference-free SimPO reads none and caches nothing.
The layout, batch size and device are left out on purpose: they change the values only at float rounding (~1e-6).

An entry is built under a temporary name and renamed into place, holding its lock in the cache's `locks/` (a second
run with the same inputs waits, then reads it). An entry that is there but damaged (a file cut short or missing,
another shape, a non-finite value, bytes that do not match the sha256 that `meta.json` recorded when it was written)
is never trusted: it is computed again, with a line saying so. The hash is checked on every read (it costs about
6 ms per million pairs, 8 MB, measured); it catches corruption and an edit of the values, not someone who rewrites
`meta.json` to match: a cache folder is trusted like the model folder it was computed from. A cache that
cannot be written is one line, and the values are kept in memory for this run only.

`split_reference_logps` is the one call a run makes per split. It is two steps, `read_reference` and
`build_reference`, so that under several processes rank 0 can build the entry while the others wait at a barrier and
then read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpo_cli.config import DpoSection, ModelSection, Recipe
from dpo_cli.data.cache import HASH_CHUNK, cache_root, preparing
from dpo_cli.dpo.scoring import reference_sequence_logps, scored_batches
from dpo_cli.files import atomic_directory, write_bytes, write_text_atomic
from dpo_cli.model.load import resolve_compute_dtype, scoring_model
from dpo_cli.model.reference_adapter import reference_digest
from dpo_cli.run.distributed import is_main_process

PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
REFERENCE_VERSION = "1"
"""Bump when what an entry holds or what its fingerprint means changes, so older entries are not reused."""
LOGPS_FILE = "logps.safetensors"
META_FILE = "meta.json"
"""Written last: an entry without it is incomplete."""
HASH_MEMO = "weight-hashes.json"
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py")
"""The files of a model folder that decide its function, besides config.json: weights, and any code of its own."""


def precompute_reference_logps(
    model,
    pairs: Sequence[Mapping],
    pad_token_id: int,
    dpo: DpoSection,
    batch_size: int,
    console: Console,
    layout: str = "padded",
    min_batches: int = 0,
    filler=None,
) -> torch.Tensor:
    """(num_pairs, 2) float32 reference log-probs of each pair's (chosen, rejected), in the order of `pairs`.
    `min_batches`: after `pairs`, the pair `filler` is scored alone, not kept, until that many batches ran (each
    forward of a sharded model is a collective: every process must run as many)."""
    device = next(model.parameters()).device
    scoring = scoring_model(model)
    was_training = model.training
    model.eval()
    values = torch.empty((len(pairs), 2), dtype=torch.float32)
    progress = Progress(
        TextColumn("[bold]reference log-probs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process(),
    )

    def reference(batch):
        return reference_sequence_logps(scoring, batch, dpo.ld_alpha)

    try:
        with progress:
            task = progress.add_task("reference", total=len(pairs))
            for start, stop, ref_logps in scored_batches(pairs, pad_token_id, layout, batch_size, device, reference):
                ref_chosen, ref_rejected = ref_logps.chunk(2)
                values[start:stop, 0] = ref_chosen.float().cpu()
                values[start:stop, 1] = ref_rejected.float().cpu()
                progress.update(task, completed=stop)
            for _ in range(min_batches - math.ceil(len(pairs) / batch_size)):
                next(scored_batches([filler], pad_token_id, layout, 1, device, reference))
    finally:
        model.train(was_training)
    return values


# When to precompute --------------------------------------------------------------------------------------------------


def wants_reference_cache(dpo: DpoSection, visits_every_pair: bool) -> bool | None:
    """True: precompute (and cache) the split's reference; None: only if the cache already holds it; False: never.

    `auto` precomputes when the run scores every pair at least once: then one pass up front costs no more than the
    live passes it replaces, and later runs get it for free."""
    if dpo.reference_free or dpo.precompute_ref == "false":
        return False
    if dpo.precompute_ref == "true" or visits_every_pair:
        return True
    return None


# The fingerprint -----------------------------------------------------------------------------------------------------


def model_folder(path: str) -> Path | None:
    """The folder holding the base model's files: a local folder, or a hub id's snapshot already on disk."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not downloaded, not a hub id, no hub library: the caller runs without the cache
        return None


def file_sha256(path: Path, memo: dict) -> str:
    """The sha256 of a file's bytes, from `memo` when its resolved path, size and mtime_ns are those remembered."""
    resolved = path.resolve()
    stat = resolved.stat()
    seen = memo.get(str(resolved))
    if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
        return seen[2]
    digest = hashlib.sha256()
    with resolved.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    memo[str(resolved)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def weights_fingerprint(folder: Path, root: Path) -> list[list[str]]:
    """[name, sha256] of config.json and each weight and code file of a model folder, hashes memoized under `root`."""
    memo_path = root / HASH_MEMO
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hash the files again
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    before = dict(memo)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.suffix in MODEL_FILE_SUFFIXES or p.name == "config.json")
    )
    hashes = [[file.name, file_sha256(file, memo)] for file in files]
    if memo != before:
        with contextlib.suppress(OSError):  # a read-only cache: the files are hashed again next time
            write_text_atomic(memo_path, json.dumps(memo))
    return hashes


def quantization_settings(model, section: ModelSection) -> dict:
    """How the base is loaded: 4-bit or not, its quantization config (quant type, double quant, compute dtype)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base.config, "quantization_config", None)
    device = next(model.parameters()).device
    return {
        "quantize": section.quantize,
        "compute_dtype": str(resolve_compute_dtype(section.compute_dtype, device)),
        "quantization_config": config.to_dict() if hasattr(config, "to_dict") else config,
    }


@dataclass
class ReferenceCache:
    """Where one split's reference log-probs are kept: `folder` (named by the fingerprint of `inputs`)."""

    folder: Path
    num_pairs: int
    inputs: dict


def reference_cache(recipe: Recipe, model, pairs_key: str, num_pairs: int) -> ReferenceCache | str:
    """The cache entry of a split's reference log-probs, or why there can be none (the model's files are not found).

    Layout and batch size are not in the fingerprint: they change the values only at float rounding (~1e-6)."""
    folder = model_folder(recipe.model.path)
    if folder is None:
        return f"the files of {recipe.model.path} are not on disk to fingerprint"
    root = cache_root(recipe.data.cache_dir)
    inputs = {
        "version": REFERENCE_VERSION,
        "pairs": pairs_key,
        "model": weights_fingerprint(folder, root),
        "loading": quantization_settings(model, recipe.model),
        "ld_alpha": recipe.dpo.ld_alpha,
    }
    adapter = reference_digest(model)
    if adapter is not None:  # absent otherwise, so the entries of runs from the bare base keep their names
        inputs["reference_adapter"] = adapter
    blob = json.dumps(inputs, sort_keys=True, default=str)
    key = hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
    return ReferenceCache(root / "reference" / key, num_pairs, json.loads(blob))


# Reading and writing an entry ----------------------------------------------------------------------------------------


def load_reference(cache: ReferenceCache) -> torch.Tensor:
    """The entry's (num_pairs, 2) values; raises (saying why) on anything but a whole entry of finite values."""
    from safetensors.torch import load

    meta = json.loads((cache.folder / META_FILE).read_text(encoding="utf-8"))
    data = (cache.folder / LOGPS_FILE).read_bytes()
    if len(data) != meta["size"]:
        raise ValueError(f"{LOGPS_FILE} has {len(data)} bytes, {meta['size']} were written")
    if "sha256" not in meta:
        raise ValueError(f"{META_FILE} records no content hash (written by an older dpo-cli)")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{LOGPS_FILE} does not match the content hash it was written with (changed or corrupted)")
    values = load(data).get("logps")
    if values is None or values.dtype != torch.float32 or tuple(values.shape) != (cache.num_pairs, 2):
        shape = "no logps" if values is None else f"{values.dtype} {tuple(values.shape)}"
        raise ValueError(f"it holds {shape}, not float32 ({cache.num_pairs}, 2)")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("it holds non-finite values")
    return values


def read_reference(cache: ReferenceCache) -> tuple[torch.Tensor | None, str | None]:
    """(values, None) of a whole entry; (None, None) when there is none; (None, why) when it is damaged."""
    if not cache.folder.exists():
        return None, None
    try:
        return load_reference(cache), None
    except Exception as error:  # a damaged entry fails in many ways (JSON, safetensors, sizes): all mean rebuild it
        return None, f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)


def read_and_say(cache: ReferenceCache, say: Callable[[str], None]) -> tuple[torch.Tensor | None, str | None]:
    """`read_reference`, saying where the values were read from when they were."""
    values, damage = read_reference(cache)
    if values is not None:
        say(f"read from cache {cache.folder}")
    return values, damage


def write_reference(folder: Path, values: torch.Tensor, cache: ReferenceCache, seconds: float) -> None:
    """The tensor, then meta.json last: its presence means the entry is complete."""
    from safetensors.torch import save

    data = save({"logps": values.contiguous()})
    write_bytes(folder / LOGPS_FILE, data)
    meta = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_pairs": cache.num_pairs,
        "seconds": seconds,
        "inputs": cache.inputs,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def build_reference(
    cache: ReferenceCache, compute: Callable[[], torch.Tensor], say: Callable[[str], None]
) -> torch.Tensor:
    """The values of `cache`, computed under its lock and stored (or read, when another run stored them meanwhile);
    kept in memory only, with a line saying why, when the cache cannot be written."""
    with contextlib.ExitStack() as held:
        try:
            cache.folder.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(
                preparing(cache.folder, lambda: say(f"another run is computing them in {cache.folder}; waiting"))
            )
        except OSError as error:
            where = f"{error.strerror or error}: {cache.folder.parent}"
            say(f"the cache cannot be written ({where}); keeping them in memory")
            return _computed(compute, say, None)
        values, damage = read_and_say(cache, say)  # another run may have stored it while this one waited
        if values is not None:
            return values
        if damage is not None:
            say(f"the cached entry {cache.folder} is damaged ({damage}); computing it again")
        return _computed(compute, say, cache)


def _computed(compute: Callable[[], torch.Tensor], say: Callable[[str], None], cache: ReferenceCache | None):
    started = time.perf_counter()
    values = compute()
    seconds = time.perf_counter() - started
    done = f"computed {len(values):,} pairs in {seconds:.1f} s"
    if cache is None:
        say(done + ", in memory only")
        return values
    if not bool(torch.isfinite(values).all()):  # never stored: a later run must not trust them
        say(done + ", not cached: some are not finite")
        return values
    try:
        with atomic_directory(cache.folder, replace=True) as folder:
            write_reference(folder, values, cache, seconds)
    except OSError as error:
        say(done + f", not cached ({error.strerror or error}: {cache.folder}); kept in memory")
        return values
    say(done + f", cached at {cache.folder}")
    return values


# The one call of a run -----------------------------------------------------------------------------------------------


@dataclass
class SplitPairs:
    """The pairs of one split as the reference is scored over them."""

    name: str
    """"train" or "eval": the lines say which."""
    pairs: Sequence[Mapping]
    pairs_key: str
    """`SplitReport.pairs_key`: names these pairs' token ids."""
    pad_token_id: int
    layout: str
    batch_size: int


ScoreSplit = Callable[[SplitPairs], torch.Tensor]
"""Scores a split's reference log-probs ((num_pairs, 2), in its order): `score_whole`, or under fsdp every process
a share (setup.py)."""


def score_whole(recipe: Recipe, model, split: SplitPairs, console: Console) -> torch.Tensor:
    """`split`'s reference log-probs scored by this process alone."""
    return precompute_reference_logps(
        model, split.pairs, split.pad_token_id, recipe.dpo, split.batch_size, console, split.layout
    )


def split_reference_logps(
    recipe: Recipe, model, split: SplitPairs, visits_every_pair: bool, console: Console, score: ScoreSplit | None = None
) -> torch.Tensor | None:
    """(num_pairs, 2) reference log-probs of `split` (read from the cache, or computed by `score`, `score_whole` by
    default, and cached), or None when the steps are to score the reference live (`dpo.precompute_ref`, see
    `wants_reference_cache`). One line says which."""
    wanted = wants_reference_cache(recipe.dpo, visits_every_pair)
    if wanted is False:
        return None
    prefix = f"{split.name} reference log-probs: " if split.name != "train" else "reference log-probs: "

    def say(line: str) -> None:
        console.print(prefix + line, markup=False)

    def compute() -> torch.Tensor:
        return score(split) if score is not None else score_whole(recipe, model, split, console)

    cache = reference_cache(recipe, model, split.pairs_key, len(split.pairs))
    if isinstance(cache, str):
        if wanted is None:
            return None
        say(f"not cached: {cache}")
        return _computed(compute, say, None)
    values, damage = read_and_say(cache, say)
    if values is not None:
        return values
    if wanted is None and damage is None:
        say("scored live in each step (the run visits fewer pairs than there are; dpo.precompute_ref=true caches them)")
        return None
    return build_reference(cache, compute, say)


def training_splits(recipe: Recipe, layout: str, pad_token_id: int, train, evaluation) -> dict[str, SplitPairs]:
    """The splits of a training run whose reference is precomputed, by name: train, and eval when `evaluation`."""
    batch_size = recipe.training.eval_batch_size
    named = {"train": train} if evaluation is None else {"train": train, "eval": evaluation}
    return {
        name: SplitPairs(name, pairs, report.pairs_key, pad_token_id, layout, batch_size)
        for name, (pairs, report) in named.items()
    }


def training_reference_logps(
    recipe: Recipe,
    model,
    layout: str,
    pad_token_id: int,
    train,
    evaluation,
    visits_every_pair: bool,
    console: Console,
    score: ScoreSplit | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The reference log-probs of a training run's train and eval splits (each `(pairs, SplitReport)`, eval may be
    None), or None for a split whose reference is scored live; `score` scores a split the cache lacks. Eval scores
    every eval pair at least once (at the end), so under `auto` its reference is always precomputed: one pass that
    the first evaluation would make anyway."""
    splits = training_splits(recipe, layout, pad_token_id, train, evaluation)
    train_logps = split_reference_logps(recipe, model, splits["train"], visits_every_pair, console, score)
    if "eval" not in splits:
        return train_logps, None
    return train_logps, split_reference_logps(recipe, model, splits["eval"], True, console, score)
