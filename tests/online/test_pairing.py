"""Pairing on rewards written out by hand: which samples pair, ties and margins dropped and counted."""

from __future__ import annotations

import pytest

from dpo_cli.online.pairing import pair_samples
from dpo_cli.online.sample import effective_reward, pairs_from_candidates


def test_max_min_pairs_the_best_with_the_worst():
    # rewards 0.5, 2.0, -1.0, 2.0: best is sample 1 (the first of the two 2.0s), worst sample 2; margin 3.0
    found = pair_samples([0.5, 2.0, -1.0, 2.0], "max-min")
    assert found.pairs == [(1, 2)]
    assert (found.counts.pairs, found.counts.ties, found.counts.prompts_without_pair) == (1, 0, 0)


def test_all_equal_rewards_are_a_tie_dropped_and_counted():
    found = pair_samples([1.0, 1.0, 1.0], "max-min")
    assert found.pairs == []
    assert (found.counts.ties, found.counts.prompts_without_pair) == (1, 1)


def test_min_margin_drops_a_smaller_difference():
    # best 1.2 - worst 1.0 = 0.2 < 0.5: dropped as below the margin, not as a tie
    found = pair_samples([1.0, 1.2], "max-min", min_margin=0.5)
    assert found.pairs == [] and found.counts.below_margin == 1 and found.counts.ties == 0
    assert pair_samples([1.0, 1.5], "max-min", min_margin=0.5).pairs == [(1, 0)]  # exactly the margin: kept


def test_none_takes_no_part_and_is_counted():
    found = pair_samples([None, 3.0, None, 1.0], "max-min")
    assert found.pairs == [(1, 3)] and found.counts.unscored == 2
    lone = pair_samples([None, 3.0, None], "max-min")
    assert lone.pairs == [] and lone.counts.prompts_without_pair == 1 and lone.counts.ties == 0


def test_all_pairs_every_two_different_rewards():
    # 3, 1, 3, 2: (0,1) 2.0, (0,2) tie, (0,3) 1.0, (2,1) 2.0 [sample 2 chosen], (1,3) -> (3,1) 1.0, (2,3) 1.0
    found = pair_samples([3.0, 1.0, 3.0, 2.0], "all")
    assert found.pairs == [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]
    assert found.counts.ties == 1
    with_margin = pair_samples([3.0, 1.0, 3.0, 2.0], "all", min_margin=1.5)
    assert with_margin.pairs == [(0, 1), (2, 1)] and with_margin.counts.below_margin == 3


def test_max_random_takes_the_best_and_a_seeded_other():
    rewards = [0.0, 5.0, 1.0, 2.0, 3.0]
    drawn = {pair_samples(rewards, "max-random", seed=seed).pairs[0] for seed in range(40)}
    assert {chosen for chosen, _ in drawn} == {1}
    assert {rejected for _, rejected in drawn} == {0, 2, 3, 4}  # any other sample, by the seed
    assert pair_samples(rewards, "max-random", seed=7).pairs == pair_samples(rewards, "max-random", seed=7).pairs
    tie = pair_samples([2.0, 2.0], "max-random", seed=0)
    assert tie.pairs == [] and tie.counts.ties == 1


def test_unknown_pairing_is_refused():
    with pytest.raises(ValueError):
        pair_samples([1.0, 2.0], "best-worst")


def test_missing_eos_penalty_changes_which_sample_is_chosen():
    # sample 0: 2.0 but cut off (penalty 1.5 -> 0.5); sample 1: 1.0 ended; sample 2: 0.0 ended
    rows = [
        {
            "prompt_number": 0,
            "sample": 0,
            "reward": 2.0,
            "ended": False,
            "prompt": "p",
            "completion": "a",
            "source": "f:1",
        },
        {
            "prompt_number": 0,
            "sample": 1,
            "reward": 1.0,
            "ended": True,
            "prompt": "p",
            "completion": "b",
            "source": "f:1",
        },
        {
            "prompt_number": 0,
            "sample": 2,
            "reward": 0.0,
            "ended": True,
            "prompt": "p",
            "completion": "c",
            "source": "f:1",
        },
    ]
    assert effective_reward(rows[0], 1.5) == 0.5
    plain, _ = pairs_from_candidates(rows, "max-min", 0.0, 0.0, seed=0)
    assert (plain[0]["chosen"], plain[0]["rejected"]) == ("a", "c")
    penalized, _ = pairs_from_candidates(rows, "max-min", 0.0, 1.5, seed=0)
    assert (penalized[0]["chosen"], penalized[0]["rejected"]) == ("b", "c")
    assert penalized[0]["reward_chosen"] == 1.0 and penalized[0]["reward_rejected"] == 0.0


def test_only_the_command_line_imports_online():
    """online/ sits on top of run/, model/ and data/; below cli nothing may reach up into it."""
    import ast

    from tests.conftest import REPO

    importers = []
    for path in (REPO / "dpo_cli").rglob("*.py"):
        if path.name == "cli.py" or "online" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            importers += [f"{path.name}: {name}" for name in names if name.startswith("dpo_cli.online")]
    assert importers == []
