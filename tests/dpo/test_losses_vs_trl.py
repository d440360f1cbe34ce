"""Every loss and loss option against TRL 1.16's DPOTrainer: same tiny model, same adapter, same batch.

For each setting both tools compute the loss of one batch on the same PEFT model (reference = adapters disabled),
and we compare the loss, the mean rewards and log-probs TRL logs, and the gradient of every LoRA weight, in fp32.
Hand-worked values of each loss are in test_losses.py.

One TRL trainer serves all settings: its `_compute_loss` reads `loss_types`, `beta`, `ld_alpha`, ... from the
trainer on every call, so we set them per case instead of paying for a new trainer (and a new PEFT wrapping of the
model) each time. It is built with `use_weighting=True` because that choice is also made at construction (the
fused head then computes log Σp² on every call). `test_reconfigured_trainer_equals_a_fresh_one` checks that the
shortcut gives what a freshly built trainer gives.
"""

from __future__ import annotations

import pytest
import torch

from dpo_cli.config import DpoSection
from dpo_cli.demo.tiny import build_model, build_tokenizer, make_pairs
from dpo_cli.dpo.layouts import collate_padded
from dpo_cli.dpo.loss_specs import F_DIVERGENCE_LOSSES
from dpo_cli.dpo.losses import LOSS_TYPES
from dpo_cli.dpo.scoring import score_batch
from dpo_cli.model.load import lora_config, scoring_model
from tests.trl_oracle import make_trl_trainer, randomize_lora, trl_batch, trl_train_metrics

PAIRS = 6
RTOL = 1e-5


def fit(model, tokenizer, records: list[dict], steps: int = 30) -> None:
    """A few steps of next-token training on the pairs' own texts.

    The comparison is only as exact as fp32 sums of per-token log-probs: one ulp of a 150-nat sum is 1e-5, and a
    log-ratio is a difference of two such sums. A fresh model spreads its probability over the whole vocabulary
    (about -6 nats a token); once it has seen the texts, a completion's log-prob is 10-30 nats, the log-ratios the
    random adapter makes are 0.2-2 nats, and rounding moves them by about 2e-6 of that. Without this, the forward-KL
    and α-divergence scores, which exponentiate the log-ratios, would differ from TRL's by ~5e-5.
    """
    texts = [r["prompt"] + r[key] + tokenizer.eos_token for r in records for key in ("chosen", "rejected")]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def fitted():
    """(fitted weights, tokenizer, records): each test's model is built from these, never trained again."""
    records = make_pairs(PAIRS, seed=3)
    texts = [p["prompt"] + c for p in make_pairs(200, seed=1) for c in (p["chosen"], p["rejected"])]
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), seed=0)
    fit(model, tokenizer, records)
    return {key: value.clone() for key, value in model.state_dict().items()}, tokenizer, records


def fitted_model(fitted):
    state, tokenizer, records = fitted
    model = build_model(len(tokenizer), seed=0)
    model.load_state_dict(state)
    return model, tokenizer, records


def trl_settings(dpo: DpoSection) -> dict:
    """DPOConfig arguments equal to a DpoSection (the loss-related ones)."""
    return {
        "beta": dpo.beta,
        "loss_type": dpo.loss_type,
        "loss_weights": dpo.loss_weights,
        "label_smoothing": dpo.label_smoothing,
        "discopop_tau": dpo.discopop_tau,
        "ld_alpha": dpo.ld_alpha,
        "use_weighting": dpo.use_weighting,
        "f_divergence_type": dpo.f_divergence_type,
        "f_alpha_divergence_coef": dpo.f_alpha_divergence_coef,
    }


def configure(trainer, dpo: DpoSection) -> None:
    """Point an existing DPOTrainer at `dpo`'s loss settings: the attributes `_compute_loss` reads per call."""
    settings = trl_settings(dpo)
    trainer.beta = settings["beta"]
    trainer.loss_types = settings["loss_type"]
    trainer.loss_weights = settings["loss_weights"] or [1.0] * len(settings["loss_type"])
    trainer.label_smoothing = settings["label_smoothing"]
    trainer.ld_alpha = settings["ld_alpha"]
    trainer.use_weighting = settings["use_weighting"]
    trainer.f_divergence_type = settings["f_divergence_type"]
    trainer.f_alpha_divergence_coef = settings["f_alpha_divergence_coef"]
    trainer.args.discopop_tau = settings["discopop_tau"]


def lora_grads(model) -> torch.Tensor:
    grads = [p.grad.detach().flatten().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def relative(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def compare(trainer, trl_inputs, batch, dpo: DpoSection, ref_logps: torch.Tensor | None = None) -> dict[str, float]:
    """{quantity: relative difference, ours vs TRL} for one batch; asserts each is within RTOL."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trl_loss, trl_metrics = trl_train_metrics(trainer, model, trl_inputs)
    trl_loss.backward()
    trl_grads = lora_grads(model)

    scores = score_batch(scoring_model(model), batch, dpo, ref_logps)
    scores.loss.backward()
    our_grads = lora_grads(model)

    ours = {
        "loss": scores.loss.item(),
        "rewards/chosen": scores.chosen_rewards.mean().item(),
        "rewards/rejected": scores.rejected_rewards.mean().item(),
        "logps/chosen": scores.logps.chosen.mean().item(),
        "logps/rejected": scores.logps.rejected.mean().item(),
    }
    diffs = {
        key: relative(value, trl_metrics[key] if key != "loss" else trl_loss.item()) for key, value in ours.items()
    }
    # Gradients: the largest element error relative to the largest gradient element. An element-wise relative test
    # would be dominated by near-zero elements, where summation order alone moves the last bits.
    diffs["grad"] = ((our_grads - trl_grads).abs().max() / trl_grads.abs().max()).item()
    assert trl_grads.abs().max() > 0, "the loss must reach the adapter"
    assert all(diff <= RTOL for diff in diffs.values()), f"{dpo}: relative differences {diffs}"
    return diffs


@pytest.fixture(scope="module")
def oracle(fitted, tmp_path_factory):
    """(TRL trainer, TRL's collated batch, our batch of the same token ids) on one tiny model with a random adapter."""
    model, tokenizer, records = fitted_model(fitted)
    trainer = make_trl_trainer(model, tokenizer, records, tmp_path_factory.mktemp("trl"), use_weighting=True)
    randomize_lora(trainer.model, seed=0)
    trl_inputs = trl_batch(trainer, PAIRS)
    batch = collate_padded([trainer.train_dataset[i] for i in range(PAIRS)], tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, trl_inputs["input_ids"])
    lengths = batch.completion_lengths()
    assert len(set(lengths.tolist())) > 2, "completions of several lengths, so length terms and LD tails matter"
    return trainer, trl_inputs, batch


# Each loss with its own options at non-default values where it has any.
LOSS_CASES = [
    {"loss_type": ["sigmoid"], "beta": 0.1},
    {"loss_type": ["sigmoid"], "beta": 0.02},
    {"loss_type": ["hinge"], "beta": 0.1},
    {"loss_type": ["ipo"], "beta": 0.1},
    {"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 1e-3},
    {"loss_type": ["exo_pair"], "beta": 0.1, "label_smoothing": 0.2},
    {"loss_type": ["nca_pair"], "beta": 0.1},
    {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.1},
    {"loss_type": ["bco_pair"], "beta": 0.1},
    {"loss_type": ["sppo_hard"], "beta": 0.1},
    {"loss_type": ["aot"], "beta": 0.1},
    {"loss_type": ["aot"], "beta": 0.1, "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired"], "beta": 0.1, "label_smoothing": 0.2},
    {"loss_type": ["apo_zero"], "beta": 0.1},
    {"loss_type": ["apo_down"], "beta": 0.1},
    {"loss_type": ["discopop"], "beta": 0.1},
    {"loss_type": ["discopop"], "beta": 0.1, "discopop_tau": 0.5},
    {"loss_type": ["sft"]},
    {"loss_type": ["sigmoid_norm"], "beta": 1.0},
    # Combinations: MPO's weighted sum, and RPO (DPO + NLL).
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "beta": 0.1},
    {"loss_type": ["sigmoid", "sft"], "beta": 0.1},
]

OPTION_CASES = [
    # LD-DPO: tails weighted by α, including the ends of its range; sft keeps reading plain sums.
    {"loss_type": ["sigmoid"], "beta": 0.1, "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "beta": 0.1, "ld_alpha": 0.0},
    {"loss_type": ["ipo"], "ld_alpha": 0.3},
    {"loss_type": ["sigmoid", "sft"], "beta": 0.1, "ld_alpha": 0.5},
    {"loss_type": ["aot"], "beta": 0.1, "ld_alpha": 0.5},
    # WPO weights on several kinds of loss, and with LD-DPO.
    {"loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True},
    {"loss_type": ["ipo"], "use_weighting": True},
    {"loss_type": ["bco_pair"], "beta": 0.1, "use_weighting": True},
    {"loss_type": ["sigmoid"], "beta": 0.1, "use_weighting": True, "ld_alpha": 0.5},
    # α-divergence: a coefficient above 1, and 1 itself (TRL falls back to reverse KL).
    {"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
    {"loss_type": ["sigmoid"], "beta": 0.1, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    # Everything at once.
    {
        "loss_type": ["ipo", "sigmoid"],
        "loss_weights": [1.0, 0.5],
        "ld_alpha": 0.5,
        "use_weighting": True,
        "f_divergence_type": "js_divergence",
    },
    {"loss_type": ["sigmoid_norm", "sft"], "beta": 1.0, "ld_alpha": 0.7, "f_divergence_type": "forward_kl"},
]


def _case_id(case: dict) -> str:
    return "-".join(f"{value}" if key == "loss_type" else f"{key}={value}" for key, value in case.items()).replace(
        " ", ""
    )


def test_every_loss_is_covered():
    assert {name for case in LOSS_CASES for name in case["loss_type"]} == set(LOSS_TYPES)


@pytest.mark.parametrize("case", LOSS_CASES + OPTION_CASES, ids=_case_id)
def test_loss_equals_trl(oracle, case):
    trainer, trl_inputs, batch = oracle
    dpo = DpoSection(**case)
    configure(trainer, dpo)
    compare(trainer, trl_inputs, batch, dpo)


@pytest.mark.parametrize("loss", F_DIVERGENCE_LOSSES)
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_equals_trl(oracle, loss, divergence):
    trainer, trl_inputs, batch = oracle
    smoothing = {"exo_pair": 0.1, "robust": 0.1}.get(loss, 0.0)
    dpo = DpoSection(loss_type=[loss], beta=0.1, label_smoothing=smoothing, f_divergence_type=divergence)
    configure(trainer, dpo)
    compare(trainer, trl_inputs, batch, dpo)


def test_reconfigured_trainer_equals_a_fresh_one(oracle, fitted, tmp_path):
    """The shortcut above is sound: a DPOTrainer built with the settings gives the loss of the reconfigured one."""
    trainer, trl_inputs, _ = oracle
    dpo = DpoSection(loss_type=["ipo", "bco_pair"], loss_weights=[1.0, 0.5], ld_alpha=0.5, use_weighting=True)
    configure(trainer, dpo)
    reconfigured, _ = trl_train_metrics(trainer, trainer.model, trl_inputs)

    model, tokenizer, records = fitted_model(fitted)
    fresh = make_trl_trainer(model, tokenizer, records, tmp_path, **trl_settings(dpo))
    randomize_lora(fresh.model, seed=0)
    built, _ = trl_train_metrics(fresh, fresh.model, trl_batch(fresh, PAIRS))
    assert built.item() == pytest.approx(reconfigured.item(), rel=1e-6)


def test_hinge_with_wpo_weights_equals_trl_forward(oracle):
    """TRL 1.16 scales hinge's ReLU output in place for WPO, which its own backward then refuses; its forward still
    runs, so the loss and rewards are compared without gradients (ours is out of place and trains)."""
    trainer, trl_inputs, batch = oracle
    dpo = DpoSection(loss_type=["hinge"], beta=0.1, use_weighting=True)
    configure(trainer, dpo)
    with torch.no_grad():
        trl_loss, trl_metrics = trl_train_metrics(trainer, trainer.model, trl_inputs)
        scores = score_batch(scoring_model(trainer.model), batch, dpo)
    assert trl_loss.item() > 0
    assert scores.loss.item() == pytest.approx(trl_loss.item(), rel=RTOL)
    assert scores.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=RTOL)
    assert scores.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], rel=RTOL)


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_precompute_ref_equals_trl(fitted, tmp_path, monkeypatch, ld_alpha):
    """Reference log-probs computed before training equal those TRL stores with `precompute_ref_log_probs` (LD-weighted
    when ld_alpha is set, as TRL stores them), in batches of another size; a step that reads them runs no reference
    pass and gives TRL's loss, rewards and gradients."""
    from rich.console import Console

    from dpo_cli.dpo import scoring as objective
    from dpo_cli.run.reference import precompute_reference_logps

    model, tokenizer, records = fitted_model(fitted)
    trainer = make_trl_trainer(
        model, tokenizer, records, tmp_path, precompute_ref_log_probs=True, ld_alpha=ld_alpha, beta=0.1
    )
    randomize_lora(trainer.model, seed=0)
    rows = [trainer.train_dataset[i] for i in range(PAIRS)]
    theirs = torch.tensor([[row["ref_chosen_logps"], row["ref_rejected_logps"]] for row in rows])

    dpo = DpoSection(beta=0.1, ld_alpha=ld_alpha, precompute_ref=True)
    ours = precompute_reference_logps(trainer.model, rows, tokenizer.pad_token_id, dpo, 4, Console(quiet=True))
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("a step with precomputed reference log-probs ran the reference model")

    monkeypatch.setattr(objective, "reference_logps", no_reference_pass)
    batch = collate_padded(rows, tokenizer.pad_token_id)
    configure(trainer, dpo)
    compare(trainer, trl_batch(trainer, PAIRS), batch, dpo, ref_logps=ours)


def cpo_layout_pairs(cpo_inputs) -> list[dict]:
    """TRL CPOTrainer's padded batch back to token-id pairs: the prompt is what its labels mask."""
    pairs = []
    for i in range(cpo_inputs["chosen_input_ids"].shape[0]):
        pair = {}
        for side in ("chosen", "rejected"):
            real = cpo_inputs[f"{side}_attention_mask"][i].bool()
            ids = cpo_inputs[f"{side}_input_ids"][i][real].tolist()
            start = int((cpo_inputs[f"{side}_labels"][i][real] != -100).nonzero()[0])
            pair.setdefault("prompt_ids", ids[:start])
            assert pair["prompt_ids"] == ids[:start], "chosen and rejected share the prompt tokens"
            pair[f"{side}_ids"] = ids[start:]
        pairs.append(pair)
    return pairs


@pytest.mark.parametrize("cpo_alpha", [0.0, 0.5])
def test_reference_free_equals_trl_cpo_simpo(fitted, tmp_path, monkeypatch, cpo_alpha):
    """TRL 1.16's DPOTrainer has no reference-free mode; its (experimental) CPOTrainer has SimPO as
    `loss_type="simpo"`, plus the NLL of the chosen tokens weighted by `cpo_alpha` (CPO-SimPO). Ours is
    `reference_free` with loss_type [sigmoid, sft] and loss_weights [1, cpo_alpha]: same loss, rewards (β times the
    mean token log-prob) and LoRA gradients."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from dpo_cli.config import LoraSection
    from dpo_cli.dpo import scoring as objective

    model, tokenizer, records = fitted_model(fitted)
    args = CPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.8,
        cpo_alpha=cpo_alpha,
        per_device_train_batch_size=PAIRS,
        remove_unused_columns=False,
    )
    trainer = CPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora_config(LoraSection()),
    )
    randomize_lora(trainer.model, seed=0)
    cpo_inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    policy = trainer.model
    policy.train()
    cpo_loss, cpo_metrics = trainer.get_batch_loss_metrics(policy, cpo_inputs)
    cpo_loss.backward()
    cpo_grads = lora_grads(policy)

    loss_type, weights = (["sigmoid"], None) if cpo_alpha == 0 else (["sigmoid", "sft"], [1.0, cpo_alpha])
    dpo = DpoSection(beta=2.0, gamma=0.8, reference_free=True, loss_type=loss_type, loss_weights=weights)
    batch = collate_padded(cpo_layout_pairs(cpo_inputs), tokenizer.pad_token_id)
    monkeypatch.setattr(objective, "reference_logps", None)  # reference-free: calling it would fail
    scores = score_batch(scoring_model(policy), batch, dpo)
    scores.loss.backward()
    our_grads = lora_grads(policy)

    assert scores.loss.item() == pytest.approx(cpo_loss.item(), rel=RTOL)
    assert scores.chosen_rewards.mean().item() == pytest.approx(cpo_metrics["rewards/chosen"], rel=RTOL)
    assert scores.rejected_rewards.mean().item() == pytest.approx(cpo_metrics["rewards/rejected"], rel=RTOL)
    assert ((our_grads - cpo_grads).abs().max() / cpo_grads.abs().max()).item() <= RTOL
