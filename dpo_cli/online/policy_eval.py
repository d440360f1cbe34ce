"""`dpo-cli eval --reward SPEC --generate N`: the objective DPO optimises, measured on samples.

For each of N prompts, one sample from the policy and one from the reference, under the same seed (temperature 1,
no top-p: the models' own distributions). Reported:
- the mean reward of each, and the policy's win rate over the reference (a tie counts a half);
- the sampled KL(pi || pi_ref): the mean over the policy's samples of log pi(y|x) - log pi_ref(y|x), an unbiased
  estimate of the KL between the two distributions over completions (cut at --max-new-tokens);
- E[r] - beta * KL, the KL-regularised objective whose optimum DPO's loss is derived from (the seed derivation's Eq 3).

A prompt any reward has no opinion on (None) is left out of the reward means and the win rate, and counted.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from dpo_cli.model.load import reference_mode
from dpo_cli.online.generation import (
    SamplingSettings,
    completion_logps,
    context_length,
    generate_rows,
    sample_seed,
    token_limit,
)
from dpo_cli.online.prompts import Prompt, read_prompts
from dpo_cli.online.rewards import RewardSet
from dpo_cli.online.sample import completion_text, completion_value, eos_ids, prompt_ids


@dataclass
class PromptResult:
    number: int
    prompt: Prompt
    prompt_ids: list[int]
    policy_ids: list[int]
    reference_ids: list[int]
    policy_text: str | list
    reference_text: str | list
    reward_policy: float | None
    reward_reference: float | None
    logp_policy: float
    """log pi(y|x) of the policy's sample y."""
    logp_reference: float
    """log pi_ref(y|x) of the same sample."""

    @property
    def log_ratio(self) -> float:
        return self.logp_policy - self.logp_reference

    @property
    def win(self) -> float | None:
        """1 the policy's sample scored higher, 0.5 a tie, 0 lower; None when either has no reward."""
        if self.reward_policy is None or self.reward_reference is None:
            return None
        return (
            1.0
            if self.reward_policy > self.reward_reference
            else 0.5
            if self.reward_policy == self.reward_reference
            else 0.0
        )

    def row(self) -> dict:
        """A line of --samples: eval's side-by-side fields, with the rewards and the log-ratio."""
        return {
            "index": self.number,
            "source": self.prompt.source,
            "prompt": self.prompt.text,
            "policy": self.policy_text,
            "reference": self.reference_text,
            "reward_policy": self.reward_policy,
            "reward_reference": self.reward_reference,
            "log_ratio": self.log_ratio,
        }


def evaluate_samples(
    model,
    tokenizer,
    prompts: list[Prompt],
    rewards: RewardSet,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[PromptResult]:
    """One policy and one reference sample per prompt, scored and with their log-probs; `model` is the PeftModel."""
    settings = SamplingSettings(1, max_new_tokens, 1.0, 1.0, seed)
    context, eos = context_length(model), eos_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(prompts), batch_size):
            numbers = list(range(start, min(start + batch_size, len(prompts))))
            ids = [prompt_ids(tokenizer, prompts[n]) for n in numbers]
            seeds = [sample_seed(seed, n, 0) for n in numbers]
            limits = [token_limit(len(i), max_new_tokens, context) for i in ids]
            policy = generate_rows(model, ids, seeds, limits, settings, tokenizer.pad_token_id, eos)
            with reference_mode(model):
                reference = generate_rows(model, ids, seeds, limits, settings, tokenizer.pad_token_id, eos)
            policy_ids = [c.token_ids for c in policy]
            logp_policy = completion_logps(model, ids, policy_ids, batch_size)
            with reference_mode(model):
                logp_reference = completion_logps(model, ids, policy_ids, batch_size)
            for row, number in enumerate(numbers):
                prompt = prompts[number]
                texts = [
                    completion_value(prompt, completion_text(tokenizer, ids[row], c.token_ids, prompt.is_chat))
                    for c in (policy[row], reference[row])
                ]
                columns = {key: [value] * 2 for key, value in prompt.columns.items()}
                scored, _ = rewards.score([prompt.text] * 2, texts, columns, prompt.source)
                results.append(
                    PromptResult(
                        number, prompt, ids[row], policy_ids[row], reference[row].token_ids, texts[0], texts[1],
                        scored[0], scored[1], float(logp_policy[row]), float(logp_reference[row]),
                    )
                )  # fmt: skip
            if on_batch is not None:
                on_batch(len(numbers))
    finally:
        model.train(was_training)
    return results


def sample_metrics(results: list[PromptResult], beta: float) -> dict[str, float]:
    """The table's rows: mean rewards, win rate, sampled KL, E[r] - beta KL, and the counts behind them."""
    scored = [r for r in results if r.win is not None]
    kl = statistics.fmean(r.log_ratio for r in results) if results else float("nan")
    reward_policy = statistics.fmean(r.reward_policy for r in scored) if scored else float("nan")
    return {
        "samples/reward_policy": reward_policy,
        "samples/reward_reference": statistics.fmean(r.reward_reference for r in scored) if scored else float("nan"),
        "samples/win_rate": statistics.fmean(r.win for r in scored) if scored else float("nan"),
        "samples/kl": kl,
        "samples/objective": reward_policy - beta * kl,
        "samples/prompts": len(results),
        "samples/unscored": len(results) - len(scored),
    }


def reward_scorer(rewards: RewardSet, generate: int, max_new_tokens: int, seed: int) -> Callable:
    """eval's `sample_scorer`: the first `generate` distinct prompts of the eval files, sampled and scored."""

    def score(model, tokenizer, recipe, advance) -> tuple[dict, list[dict]]:
        prompts = read_prompts(list(recipe.data.eval), recipe.data)[:generate]
        batch_size = recipe.training.eval_batch_size
        results = evaluate_samples(model, tokenizer, prompts, rewards, max_new_tokens, seed, batch_size, advance)
        return sample_metrics(results, recipe.dpo.beta), [result.row() for result in results]

    return score
