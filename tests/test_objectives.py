"""Objectives against hand computations and against TRL's DPO implementation."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.objectives import contrastive, dpo, sft, span_mask, token_logprobs, weighted_nll

LOGPS = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
WEIGHTS = torch.tensor([0.25, 0.75])


def test_weighted_nll_per_token_by_hand():
    # row 0 masked NLL = 3.0, row 1 = 4.25; 4 masked tokens
    expected = (0.25 * 3.0 + 0.75 * 4.25) / 4
    assert weighted_nll(LOGPS, MASK, WEIGHTS, "token").item() == pytest.approx(expected)
    assert weighted_nll(LOGPS, MASK, WEIGHTS, "token", denominator=10.0).item() == pytest.approx(expected * 4 / 10)


def test_weighted_nll_per_weighted_token_is_self_normalised():
    # denominator sum_i w_i * tokens_i = 0.25 * 2 + 0.75 * 2 = 2
    expected = (0.25 * 3.0 + 0.75 * 4.25) / 2
    assert weighted_nll(LOGPS, MASK, WEIGHTS, "weighted_token").item() == pytest.approx(expected)
    # the weights set each row's share, not the loss's scale
    assert weighted_nll(LOGPS, MASK, WEIGHTS * 0.5, "weighted_token").item() == pytest.approx(expected)
    # ... except that a batch weighing under one token in all is not blown up (its samples all but missed)
    tiny = weighted_nll(LOGPS, MASK, WEIGHTS * 0.01, "weighted_token").item()
    assert tiny == pytest.approx(0.01 * (0.25 * 3.0 + 0.75 * 4.25))
    ones = torch.ones(2)
    assert weighted_nll(LOGPS, MASK, ones, "weighted_token").item() == pytest.approx(sft(LOGPS, MASK).item())


def test_weighted_nll_per_sequence_by_hand():
    expected = (0.25 * 3.0 / 2 + 0.75 * 4.25 / 2) / 2
    assert weighted_nll(LOGPS, MASK, WEIGHTS, "sequence").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="normalize='tokens'"):
        weighted_nll(LOGPS, MASK, WEIGHTS, "tokens")


def test_sft_is_weighted_nll_with_unit_weights():
    assert sft(LOGPS, MASK).item() == pytest.approx((3.0 + 4.25) / 4)


def test_token_logprobs_predict_the_next_token():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    got = token_logprobs(logits, ids)
    by_hand = torch.log_softmax(logits, -1)[0, 2, ids[0, 3]]
    assert got.shape == (2, 4) and got[0, 2].item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_dpo_by_hand_with_label_smoothing():
    chosen, rejected = torch.tensor([-3.0]), torch.tensor([-5.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0]), torch.tensor([-4.5])
    delta = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    assert dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.5).item() == pytest.approx(-logsig(0.5 * delta))
    smoothed = -(0.9 * logsig(0.75) + 0.1 * logsig(-0.75))
    assert dpo(chosen, rejected, ref_chosen, ref_rejected, 0.5, 0.1).item() == pytest.approx(smoothed)


def test_span_mask_keeps_the_targets_predicting_tokens_in_each_rows_span():
    # 7 tokens, so 6 targets (target p predicts token p + 1); row 0 keeps tokens 5..6, row 1 token 3 alone
    got = span_mask(6, torch.tensor([5, 3]), torch.tensor([7, 4]))
    assert got.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]


def test_contrastive_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = contrastive(q, p, temperature=0.5).item()
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(2 * s)))
    row1 = -math.log(math.exp(2 * s) / (math.exp(0.0) + math.exp(2 * s)))
    assert loss == pytest.approx((row0 + row1) / 2, rel=1e-5)
    harder = contrastive(q, p, hard_negatives=torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]]), temperature=0.5).item()
    assert harder > loss  # hard negatives close to each query make the task harder


def test_dpo_matches_trl_on_the_same_tokens(tiny_policy, tiny_policy_other):
    """Our trainer's DPO loss equals TRL's DPOTrainer loss on the same tokens and the same reference logprobs.

    TRL computes the policy's logprobs itself (its fused LM head) and applies its own loss; the reference logprobs are
    handed to it precomputed (TRL's `precompute_ref_logps` path), because its tiled no-grad reference head differs
    from a plain forward by ~1e-3 nats per sequence.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from pipelines.train import Example, PairExample, PolicyTrainer, TrainSettings

    prompt = [5, 6, 7, 8]
    pairs = [([20, 21, 22], [30, 31]), ([40, 41], [42, 43, 44]), ([50], [51, 52])]
    beta = 0.3
    ours = PolicyTrainer(
        TrainSettings(model_path=str(tiny_policy), objective="dpo", beta=beta, batch_size=1,
                      reference_path=str(tiny_policy_other)),
        [PairExample(Example(prompt + c, [0] * 3 + [1] * len(c)), Example(prompt + r, [0] * 3 + [1] * len(r)))
         for c, r in pairs],
    )
    rows = ours.examples
    our_loss = ours._micro_loss(rows, torch.tensor(float(len(rows))))[0].item()
    from pipelines.train import _pad

    batch = _pad([r.chosen for r in rows] + [r.rejected for r in rows], ours.pad_id)
    with torch.no_grad():
        reference = (ours._sequence_logps(ours.reference, batch) * batch["mask"]).sum(-1)

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    trl_trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_policy),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_policy_other),
        args=DPOConfig(output_dir=str(tiny_policy.parent / "dpo"), beta=beta, report_to=[], use_cpu=True,
                       loss_type=["sigmoid"]),
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2),
        processing_class=tokenizer,
    )
    sequences = [prompt + c for c, _ in pairs] + [prompt + r for _, r in pairs]
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    inputs = {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "completion_mask": torch.tensor([[0] * len(prompt) + [1] * (len(s) - len(prompt)) + [0] * (width - len(s))
                                         for s in sequences]),
    }
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = reference[: len(pairs)], reference[len(pairs):]
    trl_trainer.precompute_ref_logps = True
    trl_loss = trl_trainer._compute_loss(trl_trainer.model, inputs, False).item()
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
