"""Training objectives: one small function each, over token logprobs, masks and weights.

The trainer computes token logprobs once (`token_logprobs`) and hands them here; nothing in this module knows about
models, batching or Ray, so each objective can be checked against a hand computation or a reference library.

Normalisers (`denominator`) are passed in rather than computed from the batch, because under data parallelism and
gradient accumulation the right denominator is the count over the whole *global* batch: a micro-batch mean would weight
short and long micro-batches alike, and results would depend on how many workers split the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1: shape (batch, length - 1)."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_sum(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-likelihood of the masked tokens: shape (batch,)."""
    return (logps * mask).sum(-1)


def weighted_nll(
    logps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    normalize: str = "token",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """- sum_i w_i * sum_t mask_it * log p(token_it), normalised per token or per sequence.

    The ExSearch M-step (reasoning and answer terms weighted by the E-step's importance weights) and DRO's selector
    and generator losses. `token`: divide by the number of masked tokens (the global batch's, via `denominator`);
    `weighted_token`: by the weighted number, sum_i w_i * tokens_i (self-normalised importance sampling: the weights
    set each row's share, not the loss's scale; with every weight 1 it is `token`); `sequence`: average each sequence
    over its own tokens, then divide by the number of sequences.
    """
    mask = mask.to(logps.dtype)
    if normalize in ("token", "weighted_token"):
        per_sequence = -masked_sum(logps, mask)
        default = mask.sum() if normalize == "token" else (weights.to(logps.dtype) * mask.sum(-1)).sum().clamp(min=1)
    elif normalize == "sequence":
        per_sequence = -masked_sum(logps, mask) / mask.sum(-1).clamp(min=1)
        default = torch.tensor(float(mask.shape[0]))
    else:
        raise ValueError(f"normalize={normalize!r} is not 'token', 'weighted_token' or 'sequence'")
    total = denominator if denominator is not None else default
    return (weights.to(logps.dtype) * per_sequence).sum() / total


def sft(logps: torch.Tensor, mask: torch.Tensor, normalize: str = "token", denominator=None) -> torch.Tensor:
    """Plain masked NLL (the warm start): `weighted_nll` with every weight 1."""
    return weighted_nll(logps, mask, torch.ones(logps.shape[0], dtype=logps.dtype), normalize, denominator)


def dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO (Rafailov et al., 2023) on sequence log-likelihoods, with conservative label smoothing (cDPO).

    loss = -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta),
    delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)). With eps = 0 this is TRL's `sigmoid` loss.
    """
    delta = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    total = denominator if denominator is not None else losses.shape[0]
    return losses.sum() / total


def span_mask(width: int, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """A (rows, width) target mask keeping the tokens with index in [start, end) of each row.

    TTPA's token-level pairs branch at one position; the tokens the two sides share carry no preference and only
    dilute the margin, so token-level DPO scores the span where they differ. Masks are over targets (length - 1):
    target position p predicts token p + 1.
    """
    tokens = torch.arange(width).unsqueeze(0) + 1  # the token index each target predicts
    return ((tokens >= starts.unsqueeze(1)) & (tokens < ends.unsqueeze(1))).float()


def token_dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO over the differing span only: the same loss as `dpo`, fed span-masked sums (see `span_mask`)."""
    return dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing, denominator)


def contrastive(
    queries: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """InfoNCE with in-batch and hard negatives (ToolRet-style retriever training).

    Row i's positive is positives[i]; every other positive and every hard negative is a negative for it. Inputs are
    L2-normalised here, so scores are cosine similarities divided by the temperature.
    """
    q = F.normalize(queries, dim=-1)
    candidates = positives if hard_negatives is None else torch.cat([positives, hard_negatives.flatten(0, -2)], 0)
    scores = q @ F.normalize(candidates, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(q.shape[0], device=q.device))


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "sft": sft,
    "weighted_nll": weighted_nll,
    "dpo": dpo,
    "token_dpo": token_dpo,
    "contrastive": contrastive,
}
PREFERENCE_OBJECTIVES = ("dpo", "token_dpo")
SEQUENCE_OBJECTIVES = ("sft", "weighted_nll")
