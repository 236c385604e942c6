"""LowBitModule + LowBitPrecision through the Python API: packed base, hooks a subclass overrides."""

import lightning as L
import torch
from torch import nn

from lowbit_ft import LowBitPrecision, QuantLinear
from lowbit_ft.adapters import AdaptedLinear, adapted_layers, attach
from lowbit_ft.quant.modules import DEFAULT_TARGETS
from lowbit_ft.train.data import InstructionDataModule
from lowbit_ft.train.module import LowBitModule


def fit(module, tmp_path, steps=2, **plugin):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, plugins=[LowBitPrecision(dtype="float32", **plugin)])
    data = InstructionDataModule(tokenizer=module.hparams.base, limit=16, max_length=96, batch_size=4)
    trainer.fit(module, data)
    return trainer


def test_plugin_leaves_no_float_weight_for_any_target(tiny_model_dir, tmp_path):
    module = LowBitModule(base=str(tiny_model_dir), adapter="qa_lora", r=4)
    fit(module, tmp_path, bits=3, group_size=32)
    seen = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        parts = name.split(".")
        if any(t in parts for t in DEFAULT_TARGETS):
            seen += 1
            kind = parts[parts.index(next(t for t in DEFAULT_TARGETS if t in parts)) + 1]
            if kind == "layer":
                assert name.endswith((".qweight", ".scales", ".zeros")), name
                assert not tensor.requires_grad, name
            else:
                assert kind == "adapter" and tensor.requires_grad, name
    assert seen == 14 * 3 + 14 * 2  # 14 packed layers (qweight, scales, zeros) + their adapters (A, B)
    assert all(isinstance(m.layer, QuantLinear) for m in adapted_layers(module.model).values())


def test_dtype_cast_of_the_plugin_keeps_packed_buffers(tiny_model_dir, tmp_path):
    module = LowBitModule(base=str(tiny_model_dir), adapter="qa_lora", r=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0,
                        plugins=[LowBitPrecision(bits=4, group_size=32, dtype="bfloat16")])
    trainer.fit(module, InstructionDataModule(tokenizer=str(tiny_model_dir), limit=8, max_length=96, batch_size=4))
    layer = next(iter(adapted_layers(module.model).values()))
    assert (layer.layer.scales.dtype, layer.layer.zeros.dtype) == (torch.float16, torch.float32)
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.adapter.lora_A.dtype == torch.float32  # adapters train in float32 under autocast


class DoubleScaledQALoRA(LowBitModule):
    """A new adapter design via the documented hooks: QA-LoRA on attention only, with a label-smoothed loss."""

    def configure_adapters(self, model: nn.Module) -> nn.Module:
        return attach(model, "qa_lora", targets=["q_proj", "v_proj"], r=2, alpha=4)

    def compute_loss(self, batch, predictions=False):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                           ignore_index=-100, label_smoothing=0.1)
        self.custom_loss_calls = getattr(self, "custom_loss_calls", 0) + 1
        return loss, logits[:, :-1].argmax(-1) if predictions else None


def test_subclass_overrides_the_hooks(tiny_model_dir, tmp_path):
    module = DoubleScaledQALoRA(base=str(tiny_model_dir))
    fit(module, tmp_path, steps=2, bits=4, group_size=32)
    wrapped = adapted_layers(module.model)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "v_proj"}
    assert all(isinstance(m, AdaptedLinear) and m.adapter.r == 2 for m in wrapped.values())
    assert module.custom_loss_calls == 2
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(("q_proj" in n or "v_proj" in n) and ".adapter." in n for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = LowBitModule(base=str(tiny_model_dir), adapter="qa_lora", r=4, gradient_checkpointing=checkpointing)
        trainer = L.Trainer(accelerator="cpu", logger=False, plugins=[LowBitPrecision(bits=4, group_size=32,
                                                                                      dtype="float32")])
        module._trainer = trainer  # configure_model reads the plugin from the trainer, as in fit
        module.configure_model()
        module.model.train()
        ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
        loss, _ = module.compute_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        loss.backward()
        flag = getattr(module.model, "is_activation_checkpointing", None)
        assert (module.model.is_gradient_checkpointing if flag is None else flag) == checkpointing
        grads.append([p.grad.clone() for p in module.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.allclose(plain, recomputed, atol=1e-6)


def test_the_chunked_training_loss_is_the_full_logits_loss(tiny_model_dir):
    """compute_loss never builds the batch's logits, yet gives what cross-entropy over them gives, and so do the
    adapter gradients (float32: sums in another order, 1e-5 relative)."""
    torch.manual_seed(0)
    module = LowBitModule(base=str(tiny_model_dir), adapter="qa_lora", r=4)
    module._trainer = L.Trainer(accelerator="cpu", logger=False, plugins=[LowBitPrecision(bits=4, group_size=32,
                                                                                         dtype="float32")])
    module.configure_model()
    for layer in adapted_layers(module.model).values():  # non-zero adapters, so every gradient is non-trivial
        torch.nn.init.normal_(layer.adapter.lora_B, std=0.02)
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for chunked in (True, False):
        module.zero_grad()
        if chunked:
            loss, predicted = module.compute_loss(batch, predictions=True)
        else:
            logits = module.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
            predicted = logits[:, :-1].argmax(-1)
        loss.backward()
        results.append((loss.detach(), predicted, [p.grad.clone() for p in module.parameters() if p.requires_grad]))
    (loss_c, pred_c, grads_c), (loss_f, pred_f, grads_f) = results
    assert torch.allclose(loss_c, loss_f, rtol=1e-6) and torch.equal(pred_c, pred_f)
    for chunked_grad, full_grad in zip(grads_c, grads_f, strict=True):
        assert (chunked_grad - full_grad).abs().max() <= 1e-5 * full_grad.abs().max()
