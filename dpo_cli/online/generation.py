"""N completions per prompt from a causal LM, batched with the KV cache; and completion log-probs under a model.

Each sample (prompt, j) draws from its own random stream, seeded by (seed, prompt number, j), one uniform number per
token turned into a token by the inverse of the (temperature-scaled, top-p-cut) distribution. So a sample does not
depend on which other prompts share its batch, on the batch size, or on where a resumed run restarted; only on the
model's logits for that row. Rows are left-padded (`run.generate.left_padded`), each with its own position ids, and
each stops at EOS or at its own limit: `max_new_tokens`, cut so that prompt + completion fits the model's context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpo_cli.run.generate import left_padded


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    """The sampled tokens, EOS included when the sample ended."""
    ended: bool
    """It stopped at EOS; False: it hit its token limit first (TRL's missing EOS)."""


def sample_seed(seed: int, prompt_number: int, sample_number: int) -> int:
    """The seed of one sample's random stream: a hash, so nearby (seed, prompt, sample) triples share nothing."""
    digest = hashlib.blake2b(f"{seed}:{prompt_number}:{sample_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def token_limit(prompt_length: int, max_new_tokens: int, context: int | None) -> int:
    """New tokens a prompt may get: `max_new_tokens`, or what is left of the model's context."""
    return max_new_tokens if context is None else max(0, min(max_new_tokens, context - prompt_length))


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) probabilities after temperature and top-p (nucleus: the smallest set of tokens whose mass reaches
    top_p; the most likely token is always kept), in float32."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) tokens: the inverse CDF of each row at its uniform number in [0, 1)."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    targets = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate_rows(
    model,
    prompts: Sequence[list[int]],
    seeds: Sequence[int],
    limits: Sequence[int],
    settings: SamplingSettings,
    pad_token_id: int,
    eos_token_ids: set[int],
) -> list[Completion]:
    """One completion per row: row r continues `prompts[r]` for at most `limits[r]` tokens under `seeds[r]`."""
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    input_ids, attention_mask = left_padded(list(prompts), pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [limit <= 0 for limit in limits]
    ended = [False] * rows
    output = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    while not all(done):
        probs = filtered_probs(output.logits[:, -1, :], settings.temperature, settings.top_p)
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        next_tokens = draw(probs, uniforms).tolist()
        for r, token in enumerate(next_tokens):
            if done[r]:
                next_tokens[r] = pad_token_id
                continue
            tokens[r].append(token)
            if token in eos_token_ids:
                done[r] = ended[r] = True
            elif len(tokens[r]) >= limits[r]:
                done[r] = True
        if all(done):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
        positions = positions[:, -1:] + 1
        output = model(
            input_ids=torch.tensor(next_tokens, device=device).unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=positions,
            cache=output.cache,
            use_cache=True,
        )
    return [Completion(row_tokens, row_ended) for row_tokens, row_ended in zip(tokens, ended, strict=True)]


@torch.no_grad()
def completion_logps(model, prompts: Sequence[list[int]], completions: Sequence[list[int]], batch_size: int = 16):
    """Sum of log p(completion token | everything before it) per row, at temperature 1, as a (B,) float64 tensor.

    Rows are right-padded and scored one batch at a time; the logits of the completion positions only are used."""
    device = next(model.parameters()).device
    totals = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True))
        width = max(len(p) + len(c) for p, c in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (prompt, completion) in enumerate(chunk):
            ids = prompt + completion
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t+1
        picked = logps.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
        for row, (prompt, completion) in enumerate(chunk):
            first = len(prompt) - 1
            totals.append(picked[row, first : first + len(completion)].sum())
    return torch.stack(totals) if totals else torch.zeros(0, dtype=torch.float64)
