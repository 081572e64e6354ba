"""Memory-aware execution of one request: micro-batches of whole datums within a token budget, and target
log-probabilities without full-vocabulary logits for the whole batch.

Why this is exact: every Tinker loss is a sum over tokens of per-token terms computed within one datum
(GSPO's sequence ratio too), so running the datums in several passes and summing their gradients gives the
gradient of one pass, up to float rounding. Memory then follows the budget, not the request:

- datums are sorted by length before they are grouped, so a batch of one long and many short datums is not
  padded to (rows x longest) — the short ones run together, the long one alone;
- the unembedding runs on real tokens only (padding dropped) in chunks of ``logits_chunk`` tokens, each
  recomputed in the backward pass (activation checkpointing), so at most one chunk of
  ``logits_chunk x vocabulary`` logits is alive at a time instead of ``rows x longest x vocabulary``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of datums grouped so that each group's padded size (rows x its longest datum) stays within
    ``token_budget``; shortest first. A datum longer than the budget runs alone."""
    if token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        # sorted ascending: the newest datum is the group's longest
        if groups and (len(groups[-1]) + 1) * lengths[i] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def one_pass(lengths: Sequence[int], token_budget: int) -> bool:
    """Whether ``micro_batches(lengths, token_budget)`` is a single group, in O(n) without grouping: all rows
    padded to the longest fit the budget (a lone datum always runs as one pass)."""
    return len(lengths) <= 1 or len(lengths) * max(lengths) <= token_budget


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def target_logprobs(decoder: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor,
                    targets: torch.Tensor, *, logits_chunk: int) -> torch.Tensor:
    """log p(target) per position of a right-padded [B, T] batch; 0 (and no gradient) at padding.

    ``decoder`` maps token ids to final hidden states (the model without its unembedding); ``head`` is the
    unembedding (with its LoRA, if any)."""
    hidden = decoder(input_ids=ids, attention_mask=valid.to(torch.int64), use_cache=False).last_hidden_state
    real = valid > 0
    h, t = hidden[real], targets[real]
    parts = []
    for start in range(0, h.shape[0], logits_chunk):
        hc, tc = h[start:start + logits_chunk], t[start:start + logits_chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, hc, tc, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, hc, tc))
    lp = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if parts:
        lp = lp.index_put((real.nonzero(as_tuple=True)), torch.cat(parts))
    return lp
