"""A built-in tiny model and preference data, made on the spot: for `make demo` and the tests, with no download.

The task is a miniature of the DPO paper's controlled-sentiment experiment. Prompts start a sentence about a
character; the chosen completion is cheerful, the rejected one gloomy. The tiny Llama is first taught plain
language on both kinds of completion (a few seconds of next-token training), so before DPO it is indifferent to
sentiment; DPO should then make cheerful completions more likely than gloomy ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

HAPPY_WORDS = ["happy", "smiled", "laughed", "sunny", "glad", "joy", "bright", "warm", "friends", "played"]
SAD_WORDS = ["sad", "cried", "gloomy", "rainy", "lonely", "lost", "dark", "cold", "broken", "angry"]
NAMES = ["Tom", "Lily", "Max", "Sue", "Ben", "Mia", "Sam", "Anna"]
PLACES = ["the park", "the beach", "the forest", "school", "the garden", "the lake"]
HAPPY_TEMPLATES = [
    "{name} was {w1} and {w2} all day.",
    "It was a {w1} day, and {name} {w2} with the dog.",
    "{name} felt {w1}. The sky was {w2}.",
]
SAD_TEMPLATES = [
    "{name} was {w1} and {w2} all day.",
    "It was a {w1} day, and {name} {w2} near the wall.",
    "{name} felt {w1}. The sky was {w2}.",
]
PROMPT_TEMPLATES = ["One day {name} went to {place}.", "{name} walked to {place} after lunch.", "At {place}, {name}"]


def _sentence(rng: random.Random, templates: list[str], words: list[str], name: str) -> str:
    first, second = rng.sample(words, 2)
    return " " + rng.choice(templates).format(name=name, w1=first, w2=second)


def make_pairs(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        name = rng.choice(NAMES)
        prompt = rng.choice(PROMPT_TEMPLATES).format(name=name, place=rng.choice(PLACES))
        pairs.append(
            {
                "prompt": prompt,
                "chosen": _sentence(rng, HAPPY_TEMPLATES, HAPPY_WORDS, name),
                "rejected": _sentence(rng, SAD_TEMPLATES, SAD_WORDS, name),
            }
        )
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def build_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on `texts`, with <s> prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int = 0) -> None:
    """Plain next-token training so the tiny model speaks the task's language before any DPO."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = tokenizer([t + tokenizer.eos_token for t in rng.sample(texts, 32)], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_demo(root: Path, pretrain_steps: int = 150, train_pairs: int = 400, test_pairs: int = 100) -> dict[str, Path]:
    """Write `model/` (a tiny pretrained Llama + tokenizer), `train.jsonl` and `test.jsonl` under `root`."""
    root = Path(root)
    train = make_pairs(train_pairs, seed=1)
    test = make_pairs(test_pairs, seed=2)
    texts = [p["prompt"] + c for p in train for c in (p["chosen"], p["rejected"])]
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer))
    if pretrain_steps:
        pretrain(model, tokenizer, texts, pretrain_steps)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {
        "model": root / "model",
        "train": write_jsonl(root / "train.jsonl", train),
        "test": write_jsonl(root / "test.jsonl", test),
    }


def happy_score(text: str) -> int:
    """Cheerful minus gloomy words: how the demo and the tests judge a sample's sentiment."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    return sum(w in HAPPY_WORDS for w in words) - sum(w in SAD_WORDS for w in words)


def happy_reward(prompts: list, completions: list, **columns) -> list[float]:
    """`happy_score` as a reward function with TRL's contract: `--reward dpo_cli.demo.tiny:happy_reward`."""
    return [float(happy_score(completion)) for completion in completions]
