"""The README's stories-happy comparison: iterate runs' rounds against an offline run, on the same held-out prompts.

Reads each `dpo-cli iterate` folder's iterate-state.json (each round's eval: reward of the policy and of the base on
the held-out prompts, win rate, sampled KL against the base) and the offline run's `dpo-cli eval --generate N
--reward ... --output FILE` (the same measurement of its adapter against its reference, the base); prints the
README's table (markdown) and draws reward against KL, one line per iterate run and the offline point.

    python bench/iterate_vs_offline.py --iterate previous=runs/iterate --iterate initial=runs/iterate-initial \
        --offline runs/offline-eval.json --steps-per-round 8 --offline-steps 24 --output docs/iterate-vs-offline.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rows(args) -> tuple[list[list[str]], dict]:
    from dpo_cli.online.iterate import frontier_points, read_state

    offline = json.loads(Path(args.offline).read_text())["metrics"]
    base = offline["samples/reward_reference"]
    table = [["base", "0", f"{base:.3f}", "", "", "0"]]
    table.append(
        [
            f"offline `train`, {args.offline_steps} steps",
            str(args.offline_steps),
            f"{offline['samples/reward_policy']:.3f}",
            f"{offline['samples/reward_policy'] - base:+.2f}",
            f"{offline['samples/win_rate']:.3f}",
            f"{offline['samples/kl']:.1f}",
        ]
    )
    lines = {}
    for spec in args.iterate:
        name, _, folder = spec.partition("=")
        state = read_state(Path(folder))
        lines[name] = frontier_points(state)
        for record in state["rounds"]:
            scores = record.get("eval")
            if not scores:
                continue
            table.append(
                [
                    f"`iterate --reference {name}`, round {record['round']}",
                    str(args.steps_per_round * record["round"]),
                    f"{scores['samples/reward_policy']:.3f}",
                    f"{scores['samples/reward_policy'] - scores['samples/reward_reference']:+.2f}",
                    f"{scores['samples/win_rate']:.3f}",
                    f"{scores['samples/kl']:.1f}",
                ]
            )
    return table, {"lines": lines, "offline": (offline["samples/kl"], offline["samples/reward_policy"]), "base": base}


def draw(path: Path, points: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, line in points["lines"].items():
        axes.plot(*zip(*line, strict=True), marker="o", label=f"iterate --reference {name}")
        for index, (kl, reward) in enumerate(line):
            axes.annotate(str(index), (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.plot(*points["offline"], marker="s", color="black", linestyle="none", label="offline train")
    axes.set_xlabel("sampled KL(policy || base), nats")
    axes.set_ylabel("mean reward on held-out prompts")
    axes.set_title("stories-happy: reward against KL (0: the base, r: round r)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterate", action="append", required=True, help="NAME=FOLDER of an iterate run")
    parser.add_argument("--offline", required=True, help="the offline run's eval --output JSON")
    parser.add_argument("--steps-per-round", type=int, required=True)
    parser.add_argument("--offline-steps", type=int, required=True)
    parser.add_argument("--output", type=Path, help="PNG to draw")
    args = parser.parse_args()
    table, points = rows(args)
    header = ["", "training steps", "reward", "gain over the base", "win rate vs base", "sampled KL vs base (nats)"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in table:
        print("| " + " | ".join(row) + " |")
    if args.output:
        draw(args.output, points)


if __name__ == "__main__":
    main()
