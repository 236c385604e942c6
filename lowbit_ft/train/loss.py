"""The next-token loss computed in chunks of positions, so the float32 logits of the whole batch never exist.

Why: the LM head turns every position into a vocabulary-sized row. LLaMA-3's 128,256-token vocabulary makes
a batch of 4 × 2048 positions 128,256 × 8,192 × 4 B = 4.2 GB of float32 logits — and the plain
`cross_entropy(logits.float(), ...)` keeps more than one such buffer alive (the model-dtype logits, their
float32 copy, the saved log-softmax, and in backward the gradients of each), often more than the adapters,
activations and optimizer state of a 4-bit 8B model together.

`chunked_cross_entropy` applies the head to `chunk_size` positions at a time, takes each chunk's loss in
float32 and drops its logits; in backward every chunk's logits are computed again from the hidden states
(`torch.utils.checkpoint`, non-reentrant: gradients reach `hidden` and any trainable parameter of the head) and
turned straight into one float32 gradient buffer (softmax − one-hot; the logsumexp is kept from forward, one
float per position). Positions without a target never reach the head. The peak extra memory is about
8 bytes × chunk_size × vocabulary whatever the batch — tests/test_loss.py measures it — and the loss and its
gradients are today's up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from lowbit_ft.records import IGNORE_INDEX

#: positions per chunk: the peak is about 8 B × 128 × vocabulary — 131 MB for LLaMA-3's 128,256 tokens, an
#: eighth of 2048 positions' float32 logits — and a 128-row chunk still keeps a GPU's matrix units busy
DEFAULT_CHUNK_SIZE = 128


class _LogitsCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(logits.float(), targets), rows whose target is IGNORE_INDEX adding 0.

    What autograd would keep for `cross_entropy` is the float32 log-softmax, and its backward allocates two
    more float32 buffers of that size; here backward builds the gradient in one: exp(logits − logsumexp) − one-hot,
    times the incoming gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, memo: dict) -> Tensor:
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        if "lse" not in memo:  # backward's recomputation gives the same logits: their logsumexp is kept
            memo["lse"] = _logsumexp(logits)
        lse = memo["lse"]
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, safe, valid)
        return torch.where(valid, lse - picked, 0.0).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, safe, valid = ctx.saved_tensors
        probs = logits - lse[:, None]  # float32 by type promotion, a new buffer: the saved logits stay unchanged
        probs.exp_()
        probs.scatter_add_(1, safe[:, None], probs.new_full((len(safe), 1), -1.0))
        probs.mul_(torch.where(valid, grad, 0.0)[:, None])
        return probs.to(logits.dtype), None, None


def _logsumexp(logits: Tensor) -> Tensor:
    """float32 logsumexp of each row, with one float32 buffer of the logits' size (no float32 copy of them)."""
    top = logits.amax(1).float()
    shifted = logits - top[:, None]  # float32 by type promotion, a new buffer
    return shifted.exp_().sum(1).log_() + top


def _chunk(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, predictions: bool,
           memo: dict) -> tuple[Tensor, Tensor | None]:
    """One chunk's loss sum (and argmax); `memo` carries its logsumexp (one float per position) from the
    forward pass to the recomputation in backward."""
    logits = head(hidden)
    return _LogitsCrossEntropy.apply(logits, targets, memo), logits.argmax(-1) if predictions else None


def chunked_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE,
                          return_predictions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The mean next-token cross-entropy of `head(hidden)` against `targets`, `chunk_size` positions at a time.

    Equals `F.cross_entropy(head(hidden).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)`
    (float32 sum over the counted positions / their number) up to float32 rounding, and so do its gradients —
    to `hidden` and to any parameter of `head` that requires grad — but only one chunk's logits are alive at a
    time, in forward and in backward. One difference: with no counted position the loss is 0 (gradients 0),
    where `F.cross_entropy` gives NaN.

    Args:
        hidden: (B, T, H) the hidden states of the positions that predict — for a causal LM's final hidden
            states h, `h[:, :-1]` — in the model's dtype.
        head: hidden chunk (n, H) → logits (n, V) in the model's dtype, e.g. the model's `lm_head` module
            (anything that only reads its input; it runs twice per chunk when gradients are wanted).
        targets: (B, T) long: the next tokens (`next_token_labels(labels)[0]`), IGNORE_INDEX where no loss.
        chunk_size: positions per chunk; the peak extra memory is about 8 bytes × chunk_size × V (logits,
            their float32 softmax and its gradient in the model dtype).
        return_predictions: also return the (B, T) long argmax of the logits at every position (for token
            accuracy). Without it, positions whose target is IGNORE_INDEX are skipped — the head never sees them.

    Returns the float32 scalar loss, or (loss, predictions).
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_cross_entropy: hidden must be (B, T, H) and targets (B, T), got hidden "
                         f"{tuple(hidden.shape)} and targets {tuple(targets.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive integer, got {chunk_size!r}")
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    counted = flat_targets != IGNORE_INDEX
    if return_predictions:
        count = counted.sum()
    else:  # only counted positions go through the head (one host sync: the number of chunks)
        keep = counted.nonzero().squeeze(1)
        count = keep.numel()
        if count == 0:  # 0, still part of the graph so that backward runs and gives zero gradients
            return hidden.reshape(-1)[:0].sum().float()
        flat, flat_targets = flat.index_select(0, keep), flat_targets.index_select(0, keep)
    recompute = torch.is_grad_enabled()
    total, predictions = flat.new_zeros((), dtype=torch.float32), []
    for rows, row_targets in zip(flat.split(chunk_size), flat_targets.split(chunk_size), strict=True):
        if recompute:
            loss, pred = checkpoint(_chunk, head, rows, row_targets, return_predictions, {}, use_reentrant=False)
        else:
            loss, pred = _chunk(head, rows, row_targets, return_predictions, {})
        total = total + loss
        predictions.append(pred)
    if not return_predictions:
        return total / count
    loss = total / count.clamp(min=1)
    return loss, torch.cat(predictions).view(targets.shape)
