"""Training on the policy's own samples: rewards, sampling with scoring, pairing, and the commands built on them.

- `rewards`: `--reward SPEC` (a user's function, TRL's contract, or a local sequence-classification reward model),
  loaded only because the command line named it, and checked for what it returns.
- `generation`: N completions per prompt, batched with the KV cache, each row with its own seeded random stream, so
  batching and resuming do not change a sample; and the log-probs of completions under a model.
- `pairing`: pure functions from scored samples to (chosen, rejected) pairs.
- `prompts`: prompts from prompt files or from any pair or conversation file the data readers know.
- `sampling_options`: the sampling and pairing options `sample` and `iterate` share, declared once (the CLI builds
  both commands' flags from it); light, no torch.
- `sample`: `dpo-cli sample`, resumable; `policy_eval`: `dpo-cli eval --reward`, reward, win rate and sampled KL.
- `iterate`: `dpo-cli iterate`, rounds of sample, pair, train (reference: the previous round's policy or the
  initial one), eval; resumable.

May import `data`, `model`, `run`, `config`, `errors`, `files`, `output_folder`; nothing imports it but `cli`.
"""
