"""The inputs of bench_train.py: the preference pairs both tools read, in one order, and the base model.

`--data`: stories (../shared), hh (../shared's HH-RLHF helpful-base), tiny (dpo_cli.demo), hh-synthetic (generated
multi-turn dialogue) or a preference file of any format dpo-cli reads (read by dpo-cli's own readers, format detected,
bad records skipped, and written out as explicit prompt/chosen/rejected text, which both tools then read);
`--model`: stories260K (../shared), tiny, synthetic (a random Llama of a requested shape) or a model folder.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DPO_CLI_SHARED", REPO.parent / "shared"))
STORIES_MODEL = SHARED / "models" / "stories260K"
STORIES_DATA = SHARED / "data" / "stories-happy" / "train.jsonl"
HH_DATA = SHARED / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"

WORDS = (
    "the a to and of you I it is that for in on with can be have this my your do not are what how about would "
    "like there if some just so they was more time when one people make could will get help need know think want "
    "good use work way also other first new find try look any well because should here only many thing which "
    "really sure question answer example recipe garden water money travel history music computer language city "
    "family friend problem reason idea company health doctor school children book story car house food weather"
).split()


def _sentence_text(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        sentence = [rng.choice(WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        out.append(" ".join(sentence) + rng.choice(".?!."))
        left -= n
    return " ".join(out)


def hh_synthetic_pairs(count: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """HH-RLHF-shaped pairs: a multi-turn `\\n\\nHuman: ... \\n\\nAssistant:` prompt and two long replies.

    Lengths are drawn in words relative to `max_length` so that, with the BPE tokenizer `--model synthetic` trains on
    this text, rows spread from 40% of `max_length` to past it (mean about 80%, a third of the completions cut), as
    real dialogue data does.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt_words = rng.randint(max_length // 16, max_length // 8)
        turns = rng.randint(1, 3) if prompt_words >= 48 else 1
        prompt = ""
        for turn in range(turns):
            prompt += "\n\nHuman: " + _sentence_text(rng, max(2, prompt_words // (2 * turns)))
            if turn < turns - 1:
                prompt += "\n\nAssistant: " + _sentence_text(rng, max(2, prompt_words // (2 * turns)))
        prompt += "\n\nAssistant:"
        chosen = " " + _sentence_text(rng, rng.randint(max_length // 8, 2 * max_length // 5))
        rejected = " " + _sentence_text(rng, rng.randint(max_length // 8, 2 * max_length // 5))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dpo_cli_records(path: Path) -> tuple[list[dict], int]:
    """(the text pairs of a preference file as `dpo-cli train` reads it, records left out): its readers, its format
    detection (HH-RLHF's implicit prompt is split off as dpo-cli splits it), `--on-invalid skip`. Pairs that the
    explicit format would refuse (an HH reply that is empty after the prompt) are left out too, as both tools read
    the pairs back as explicit prompt/chosen/rejected text."""
    from dpo_cli.data.formats import RecordProblem, explicit_pairs
    from dpo_cli.data.records import ReadOptions, ReadResult, iter_file_pairs

    result = ReadResult()
    records, refused = [], 0
    for pair in iter_file_pairs(path, ReadOptions(on_invalid="skip"), result):
        record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
        try:
            explicit_pairs(record)
        except RecordProblem:
            refused += 1
            continue
        records.append(record)
    return records, len(result.invalid) + refused


def _file_records(path: Path, name: str) -> tuple[list[dict], str]:
    from dpo_cli.errors import UserError

    try:
        records, invalid = dpo_cli_records(path)
    except UserError as error:
        raise SystemExit(f"--data {name}: {error}") from None
    if any(not isinstance(r["prompt"], str) for r in records):
        raise SystemExit(f"--data {name}: conversational pairs; the benchmark takes text prompts")
    skipped = f", {invalid} invalid records or empty replies left out" if invalid else ""
    return records, f"{path} (read by dpo-cli's readers: {len(records)} pairs{skipped})"


def source_records(args, workdir: Path) -> tuple[list[dict], str]:
    if args.data == "stories":
        if not STORIES_DATA.exists():
            raise SystemExit(f"--data stories needs {STORIES_DATA} (the ../shared material); use --data tiny instead")
        return read_records(STORIES_DATA), f"stories-happy train ({STORIES_DATA})"
    if args.data == "hh":
        if not HH_DATA.exists():
            raise SystemExit(f"--data hh needs {HH_DATA} (the ../shared material); use --data hh-synthetic instead")
        records, described = _file_records(HH_DATA, "hh")
        return records, "HH-RLHF helpful-base " + described
    if args.data == "tiny":
        from dpo_cli.demo.tiny import make_pairs

        return make_pairs(400, seed=1), "dpo_cli.demo.tiny pairs (400)"
    if args.data == "hh-synthetic":
        return hh_synthetic_pairs(400, args.max_length, args.seed), "hh-synthetic (400 generated multi-turn pairs)"
    path = Path(args.data)
    if not path.is_file():
        raise SystemExit(f"--data {args.data}: not stories, hh, tiny, hh-synthetic or a preference file")
    return _file_records(path, args.data)


def drop_long_prompts(records: list[dict], model_path: str, max_length: int) -> tuple[list[dict], int]:
    """The pairs whose prompt leaves room for a completion: TRL drops the others, and dpo-cli drops or refuses them."""
    from dpo_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    kept = [r for r in records if len(tokenizer(r["prompt"])["input_ids"]) < max_length - 1]
    if not kept:
        raise SystemExit(f"every prompt fills --max-length {max_length}; raise it")
    return kept, len(records) - len(kept)


def ordered_data(records: list[dict], pairs_needed: int, seed: int, path: Path) -> Path:
    """The pairs both tools read front to back: a seeded shuffle, cycled until there are enough."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    rows = [records[order[i % len(order)]] for i in range(max(pairs_needed, len(order)))]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def synthetic_model(args, texts: list[str], root: Path, device: str) -> str:
    """A randomly initialised Llama of the requested shape with a small BPE tokenizer, saved under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_cli.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(texts)
    heads = args.heads or max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 4),
        max_position_embeddings=max(2048, args.max_length),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(root)


def resolve_model(args, records: list[dict], workdir: Path, device: str) -> tuple[str, str]:
    if args.model == "stories260K":
        if not STORIES_MODEL.exists():
            raise SystemExit(f"--model stories260K needs {STORIES_MODEL}; use --model tiny or --model synthetic")
        return str(STORIES_MODEL), "stories260K (Llama, dim 64, 5 layers, vocab 512)"
    if args.model == "tiny":
        from dpo_cli.demo.tiny import build_demo

        paths = build_demo(workdir / "tiny", pretrain_steps=0, train_pairs=50, test_pairs=10)
        return str(paths["model"]), "dpo_cli.demo.tiny Llama (dim 64, 2 layers, vocab 384)"
    if args.model == "synthetic":
        texts = [r["prompt"] + r[key] for r in records for key in ("chosen", "rejected")]
        path = synthetic_model(args, texts, workdir / "synthetic-model", device)
        heads = args.heads or max(1, args.hidden // 64)
        described = (
            f"synthetic Llama (hidden {args.hidden}, {args.layers} layers, {heads} heads, "
            f"intermediate {args.intermediate or 4 * args.hidden}, vocab {args.vocab}, tied embeddings)"
        )
        return path, described
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: not stories260K, tiny, synthetic or a model folder")
    return args.model, args.model
