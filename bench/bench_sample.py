"""`dpo-cli sample`'s generation throughput against a plain one-prompt-at-a-time `model.generate` loop.

Both sample the same prompts N times each from the same loaded model (4-bit NF4 unless --no-quantize), at
temperature 1 up to --max-new-tokens or EOS. dpo-cli's side is `online.sample.sample_prompts`, the function the
command runs for each batch of its plan (`batch_plan`: prompts grouped by length, --batch-size sequences at a time,
KV cache, per-sample seeds), with a constant reward so that only generation is timed; the loop calls
`model.generate` once per (prompt, sample), one sequence at a time, as a script would without batching.

    OMP_NUM_THREADS=2 python3 bench/bench_sample.py --model stories260K --prompts 32 --num-samples 4 \
        --max-new-tokens 48 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompt_texts(args) -> list[str]:
    from train_inputs import STORIES_DATA, hh_synthetic_pairs

    if args.model == "stories260K" and STORIES_DATA.exists():
        records = [json.loads(line) for line in STORIES_DATA.read_text().splitlines()]
    else:
        records = hh_synthetic_pairs(max(args.prompts, 50), args.max_length)
    seen = list(dict.fromkeys(record["prompt"] for record in records))
    return (seen * (args.prompts // len(seen) + 1))[: args.prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stories260K", help="stories260K, tiny, synthetic or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="dpo-cli: sequences generated together")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--loop-prompts", type=int, default=0, help="prompts the plain loop samples (0: all)")
    parser.add_argument("--json", type=Path)
    # the synthetic model's shape (train_inputs.synthetic_model)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from benchlib import sync
    from train_inputs import resolve_model

    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer
    from dpo_cli.online.prompts import Prompt
    from dpo_cli.online.rewards import Reward, RewardSet
    from dpo_cli.online.sample import Policy, batch_plan, prompt_ids, sample_prompts

    device = torch.device(args.device)
    texts = prompt_texts(args)
    with tempfile.TemporaryDirectory() as workdir:
        records = [{"prompt": t, "chosen": " a", "rejected": " b"} for t in texts]
        path, described = resolve_model(args, records, Path(workdir), args.device)
        tokenizer = load_tokenizer(path)
        model = load_base_model(ModelSection(path=path, quantize=not args.no_quantize, device=args.device), device)
        model.eval()
        policy = Policy(model, tokenizer, {})
        prompts = [Prompt(text, f"bench:{i + 1}") for i, text in enumerate(texts)]
        ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
        rewards = RewardSet([Reward("constant", lambda p, c, columns, where: [0.0] * len(c))])
        from dpo_cli.online.generation import SamplingSettings

        settings = SamplingSettings(args.num_samples, args.max_new_tokens, 1.0, 1.0, args.seed)
        sample_prompts(policy, prompts, [0], ids, settings, rewards)  # warm-up
        sync(device)
        started = time.perf_counter()
        tokens = samples = 0
        for batch in batch_plan([len(i) for i in ids], args.num_samples, args.batch_size):
            rows = sample_prompts(policy, prompts, batch, ids, settings, rewards)
            tokens += sum(row["tokens"] for row in rows)
            samples += len(rows)
        sync(device)
        ours = time.perf_counter() - started

        loop_prompts = args.loop_prompts or len(ids)
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        loop_tokens = loop_samples = 0
        with torch.no_grad():
            for prompt in ids[:loop_prompts]:
                for _ in range(args.num_samples):
                    input_ids = torch.tensor([prompt], device=device)
                    output = model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                    )  # fmt: skip
                    loop_tokens += output.shape[1] - input_ids.shape[1]
                    loop_samples += 1
        sync(device)
        loop = time.perf_counter() - started

    result = {
        "model": described,
        "device": args.device,
        "quantized": not args.no_quantize,
        "prompts": len(ids),
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "dpo_cli": {"seconds": ours, "samples_per_s": samples / ours, "tokens_per_s": tokens / ours},
        "generate_loop": {
            "prompts": loop_prompts,
            "seconds": loop,
            "samples_per_s": loop_samples / loop,
            "tokens_per_s": loop_tokens / loop,
        },
    }
    result["speedup_samples_per_s"] = result["dpo_cli"]["samples_per_s"] / result["generate_loop"]["samples_per_s"]
    print(
        f"{described}, {args.device}, {len(ids)} prompts x {args.num_samples} samples, <= {args.max_new_tokens} "
        f"new tokens\n"
        f"  dpo-cli sample (batch {args.batch_size}): {result['dpo_cli']['samples_per_s']:.1f} samples/s, "
        f"{result['dpo_cli']['tokens_per_s']:.0f} generated tokens/s\n"
        f"  model.generate one at a time ({loop_prompts} prompts): "
        f"{result['generate_loop']['samples_per_s']:.1f} samples/s, "
        f"{result['generate_loop']['tokens_per_s']:.0f} generated tokens/s\n"
        f"  speedup: {result['speedup_samples_per_s']:.2f}x samples/s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
