"""MergeCheck: passes on a correct merge, fails when one zero is corrupted — for every adapter."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

import lowbit_ft.adapters.verify as mc
from lowbit_ft.adapters import REGISTRY
from lowbit_ft.callbacks.merge_check import MergeCheck

from .conftest import make_adapted_llama


def adapted(name):
    return make_adapted_llama(name)


def held_batch():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@contextlib.contextmanager
def one_corrupted_zero(monkeypatch):
    """A faulty merge: one zero of the first layer merged comes out 1.0 off."""
    real_merge, real_dense = mc.merge_into, mc._DenseMerged.forward
    hit = {"done": False}

    def bad_merge(layer, adapter, name="adapter"):
        real_merge(layer, adapter, name)
        if not hit["done"]:
            layer.zeros[0, 0] += 1.0
            hit["done"] = True

    def bad_dense(self, x):
        self.wrapped.layer.zeros[0, 0] += 1.0
        try:
            return real_dense(self, x)
        finally:
            self.wrapped.layer.zeros[0, 0] -= 1.0

    monkeypatch.setattr(mc, "merge_into", bad_merge)
    monkeypatch.setattr(mc._DenseMerged, "forward", bad_dense)
    yield


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_passes_on_a_correct_merge(name):
    model = adapted(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = mc.check_merge(model, held_batch())
    assert figures["layer/max_rel"] < 1e-5
    low_bit = REGISTRY[name].merges_into_low_bit
    prefix = "merged" if low_bit else "dense_merged"
    assert figures[f"{prefix}/top1_agreement"] == 1.0 and figures[f"{prefix}/max_abs_logit"] < 1e-4
    if not low_bit:  # what shipping a re-quantized dense model would cost, reported beside it
        assert figures["requantized/max_abs_logit"] > figures["dense_merged/max_abs_logit"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fails_when_one_zero_is_corrupted(name, monkeypatch):
    model = adapted(name)
    check = MergeCheck(on_mismatch="raise")
    check.batch = held_batch()
    # the two attributes of trainer and module the callback reads (a full fit is in test_export_cli)
    trainer = SimpleNamespace(loggers=[], global_step=0)
    module = SimpleNamespace(model=model, device=torch.device("cpu"),
                             trainer=SimpleNamespace(precision_plugin=Precision()))
    assert check.run(trainer, module)["layer/max_rel"] < 1e-5
    with one_corrupted_zero(monkeypatch), pytest.raises(mc.MergeMismatchError, match="merge check failed"):
        check.run(trainer, module)
    warn = MergeCheck(on_mismatch="warn")
    warn.batch = held_batch()
    with one_corrupted_zero(monkeypatch):
        assert warn.run(trainer, module)["layer/max_rel"] > 1e-4


def test_layer_check_is_float32_under_bf16_autocast():
    """The training forward runs under the plugin's autocast; the per-layer criterion must not."""
    model = adapted("qa_lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        figures = mc.check_merge(model, held_batch())
    assert figures["layer/max_rel"] < 1e-5
