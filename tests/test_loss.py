"""The chunked next-token loss: today's loss and gradients, without the batch's float32 logits in memory."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit_ft.records import IGNORE_INDEX
from lowbit_ft.train.loss import DEFAULT_CHUNK_SIZE, chunked_cross_entropy

B, T, H, V = 2, 37, 16, 1000


def unchunked(hidden, head, targets):
    """Today's loss (LowBitModule.compute_loss) on the predicting positions."""
    return F.cross_entropy(head(hidden).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def data(dtype=torch.float32, seed=0):
    """Hidden states, a trainable head with bias, and targets with a prompt-like ignored run: the first 20
    positions of row 0 (so chunks of ≤ 20 positions lie entirely in it) and a few scattered ones."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(H, V).to(dtype)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=generator)
    targets[0, :20] = IGNORE_INDEX
    targets[1, ::5] = IGNORE_INDEX
    return hidden, head, targets


def grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, head.weight, head.bias])


def assert_grads_close(got, want, rel):
    """Each gradient's largest deviation, relative to its largest entry."""
    assert len(got) == len(want)
    for name, g, w in zip(("hidden", "head.weight", "head.bias"), got, want, strict=False):
        assert g.dtype == w.dtype and g.shape == w.shape
        error = ((g.double() - w.double()).abs().max() / w.double().abs().max()).item()
        assert error <= rel, f"gradient of {name}: relative error {error:.2e} > {rel:.0e}"


# Tolerances (float32). The loss: each position's term is logsumexp − target logit over the same float32 values
# in both; only the order of the additions differs (logsumexp's, and the mean over ~60 positions, done per
# chunk here), a few ulps of a value near ln 1000 ≈ 6.9: rel 1e-6 (≈ 8 ε = 8 × 1.19e-7; measured ≤ 2.7e-7 over 5 seeds).
# The gradients: softmax − one-hot is computed as exp(z − logsumexp) here and as exp(log_softmax) there, a few ulps
# apart per entry; the matmul back to the hidden states adds 1000 such terms, so the largest deviation is held to
# 1e-5 of the largest entry (≈ 80 ε; measured ≤ 1.1e-6 over 5 seeds). Head gradients add the chunks' partial
# sums in float32.
LOSS_RTOL, GRAD_REL = 1e-6, 1e-5


@pytest.mark.parametrize("chunk_size", [1, 7, 20, 64, DEFAULT_CHUNK_SIZE, 10_000])
@pytest.mark.parametrize("return_predictions", [False, True])
def test_equals_the_unchunked_loss_and_gradients(chunk_size, return_predictions):
    """Chunk sizes that divide nothing (7), that cover the ignored run exactly (20) or the whole batch
    (10,000); with predictions every position runs, so some chunks hold only ignored positions."""
    hidden, head, targets = data()
    want = unchunked(hidden, head, targets)
    want_grads = grads(want, hidden, head)
    out = chunked_cross_entropy(hidden, head, targets, chunk_size=chunk_size, return_predictions=return_predictions)
    loss = out[0] if return_predictions else out
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, want, rtol=LOSS_RTOL, atol=0)
    assert_grads_close(grads(loss, hidden, head), want_grads, GRAD_REL)
    if return_predictions:
        with torch.no_grad():
            assert torch.equal(out[1], head(hidden).argmax(-1))


def test_both_losses_are_float32_accurate():
    """The chunked loss is as close to the float64 value as today's (so the tolerance above is float32 rounding)."""
    hidden, head, targets = data()
    exact = unchunked(hidden.double(), head.double(), targets).item()
    head.float()
    today = unchunked(hidden, head, targets).item()
    chunked = chunked_cross_entropy(hidden, head, targets, chunk_size=7).item()
    assert abs(today - exact) <= 1e-6 * exact and abs(chunked - exact) <= 1e-6 * exact


def test_bfloat16_model():
    """A bf16 head: the logits are the same bf16 values upcast, so the loss matches in float32; the gradient of
    the logits is rounded to bf16 once in both, so the hidden states' gradient agrees to bf16 rounding
    (rel 1e-2 ≈ 2.5 bf16 ulps; measured equal). The head's own gradient is not compared: chunk by chunk it
    is summed in bf16, one rounding more per chunk — the LM head is frozen in this project's training."""
    hidden, head, targets = data(torch.bfloat16)
    want = unchunked(hidden, head, targets)
    (want_hidden,) = torch.autograd.grad(want, [hidden])
    loss = chunked_cross_entropy(hidden, head, targets, chunk_size=7)
    torch.testing.assert_close(loss, want, rtol=LOSS_RTOL, atol=0)
    (got_hidden,) = torch.autograd.grad(loss, [hidden])
    assert got_hidden.dtype == torch.bfloat16
    assert_grads_close([got_hidden], [want_hidden], 1e-2)


def test_predictions_without_gradients():
    """Validation runs under no_grad: no graph, the same loss and exact argmax predictions."""
    hidden, head, targets = data()
    with torch.no_grad():
        loss, predictions = chunked_cross_entropy(hidden, head, targets, chunk_size=7, return_predictions=True)
        want = unchunked(hidden, head, targets)
        assert torch.equal(predictions, head(hidden).argmax(-1)) and predictions.dtype == torch.long
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, want, rtol=LOSS_RTOL, atol=0)


def test_ignored_positions_never_reach_the_head():
    """Without predictions only the counted positions are computed (prompt tokens cost nothing)."""
    hidden, head, targets = data()
    seen = []
    chunked_cross_entropy(hidden, lambda x: seen.append(len(x)) or head(x), targets, chunk_size=7).backward()
    counted = int((targets != IGNORE_INDEX).sum())
    assert sum(seen) == 2 * counted  # forward, and once more in backward
    assert max(seen) == 7


@pytest.mark.parametrize("return_predictions", [False, True])
def test_nothing_counted_gives_zero(return_predictions):
    """No counted position: loss 0 and zero gradients (F.cross_entropy would give NaN), backward still runs."""
    hidden, head, targets = data()
    targets.fill_(IGNORE_INDEX)
    out = chunked_cross_entropy(hidden, head, targets, chunk_size=7, return_predictions=return_predictions)
    loss = out[0] if return_predictions else out
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and not hidden.grad.any()
    assert torch.isnan(unchunked(hidden, head, targets))


def test_bad_arguments():
    hidden, head, targets = data()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_cross_entropy(hidden, head, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets \(B, T\)"):
        chunked_cross_entropy(hidden, head, targets[:, 1:])


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while the mode is on and that are still alive; `peak` is
    their maximum. Every new tensor is some op's output — the autograd-saved ones, the gradients and the
    backward's temporaries included (the autograd engine runs CPU backward under the caller's dispatch modes) —
    and each storage counts once from its creation until it is freed. Outputs that alias an input (views,
    in-place ops) allocate nothing and are skipped. What exists before does not count. Deterministic: it
    adds up sizes, no allocator or timing involved. Not seen: scratch buffers inside one kernel."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        values = out if isinstance(out, (tuple, list)) else (out,)
        for spec, value in zip(func._schema.returns, values, strict=False):
            if spec.alias_info is not None:
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self._allocated(tensor.untyped_storage())
        return out

    def _allocated(self, storage):
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, size)  # storages keep their Python object until freed

    def _freed(self, size):
        self.live -= size


def peak_extra_bytes(loss_fn) -> int:
    """Peak live bytes over forward + backward of loss_fn() (a big vocabulary, 2 × 1024 positions)."""
    torch.manual_seed(0)
    head = nn.Linear(16, 128_256, bias=False).requires_grad_(False)  # frozen, as in training
    hidden = torch.randn(2, 1024, 16, requires_grad=True)
    targets = torch.randint(0, 128_256, (2, 1024))  # every position counted: nothing skipped
    with LiveStorageBytes() as tracker:
        loss_fn(hidden, head, targets).backward()
    assert hidden.grad is not None
    return tracker.peak


FULL_LOGITS = 2 * 1024 * 128_256 * 4  # the batch's float32 logits: 1.05 GB


def test_peak_memory_is_a_fraction_of_the_logits():
    """With the default chunk size the peak extra memory over forward + backward is ≤ 1/4 of the batch's
    float32 logits (measured 131.6 MB, 1/8: one chunk's logits and its float32 softmax gradient; 525.6 MB,
    over the bound, with chunk_size=512)."""
    peak = peak_extra_bytes(lambda hidden, head, targets: chunked_cross_entropy(hidden, head, targets))
    assert peak <= FULL_LOGITS / 4, f"chunked loss: peak {peak:,} B > 1/4 of the logits' {FULL_LOGITS:,} B"


def test_the_measurement_sees_the_unchunked_logits():
    """The same measurement on today's loss: more than the whole float32 logits (measured 3.15 GB, 3×: the
    logits, the saved log-softmax, and backward's gradients), so the bound above can fail."""
    peak = peak_extra_bytes(unchunked)
    assert peak >= FULL_LOGITS, f"the tracker missed the unchunked logits: {peak:,} B < {FULL_LOGITS:,} B"
