"""`DemoReport`: what the demo exists to show, printed at the end of `fit` — the merged low-bit model on
disk, reloaded the way a transformers user would, answering like the adapters did.

At fit start it answers a few prompts with the model as it is (the adapters start at ΔW = 0: the
quantized base). At fit end, after `MergeCheck` and `QuantizedExport` (list it after them), it reloads
the export with `AutoModelForCausalLM.from_pretrained`, compares its logits with the adapter-on model's,
answers the prompts again, and prints a summary: where the merged model is, its size against fp16, the
merge-check figures, the answers before and after, and the next commands.
"""

from __future__ import annotations

import lightning as L
import torch

from lowbit_ft.callbacks.export import QuantizedExport
from lowbit_ft.callbacks.merge_check import MergeCheck, whole_model
from lowbit_ft.dtypes import dtype_name
from lowbit_ft.evaluation.generate import generate_answers
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.records import format_prompt

DEMO_PROMPTS = ({"instruction": "Write the text in uppercase.", "input": "silver rocket"},
                {"instruction": "Sort the numbers in ascending order.", "input": "31, 4, 17, 9"})


class DemoReport(L.Callback):
    """Answer prompts before and after fine-tuning, the second time with the merged model reloaded from disk.

    Args:
        prompts: instruction records ({instruction, input}) to answer; default: two of the demo tasks.
        max_new_tokens: tokens generated per answer at most.
        template: the prompt template (as data.template); default: the one the training data used.
    """

    def __init__(self, prompts: list[dict] | None = None, max_new_tokens: int = 16,
                 template: str | None = None) -> None:
        self.prompts = [dict(p) for p in (prompts or DEMO_PROMPTS)]
        self.max_new_tokens, self.template = max_new_tokens, template
        self.before: list[str] = []
        self.after: list[str] = []
        self.figures: dict[str, float] = {}

    def _answers(self, model, tokenizer) -> list[str]:
        return generate_answers(model, tokenizer, self.prompts, self.max_new_tokens, self.template)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.template = self.template or getattr(trainer.datamodule, "template_used", None) or "alpaca"
        model = whole_model(pl_module)  # every rank: a sharded run gathers it to rank 0
        if trainer.is_global_zero:
            self.before = self._answers(model, pl_module.base.tokenizer)

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = whole_model(pl_module)
        if not trainer.is_global_zero:
            return
        from transformers import AutoModelForCausalLM

        tokenizer = pl_module.base.tokenizer
        export = next((cb for cb in trainer.callbacks if isinstance(cb, QuantizedExport) and cb.path), None)
        if export is None:
            print("demo: add lowbit_ft.callbacks.QuantizedExport before DemoReport to see the merged model reloaded")
            return
        reloaded = AutoModelForCausalLM.from_pretrained(export.path, dtype=torch.float32,
                                                        trust_remote_code=False).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts = [format_prompt(p, self.template, tokenizer) for p in self.prompts]
        ids = tokenizer(texts, return_tensors="pt", padding=True)
        adapter_on = model.eval()(**ids.to(next(model.parameters()).device)).logits.float().cpu()
        merged = reloaded(**ids).logits.float()
        mask = ids["attention_mask"].bool()
        self.figures = {"reloaded/max_abs_logit": float((merged - adapter_on)[mask].abs().max()),
                        "reloaded/top1_agreement": float((merged.argmax(-1) == adapter_on.argmax(-1))[mask]
                                                         .float().mean())}
        self.after = self._answers(reloaded, tokenizer)
        checked = next((cb.results for cb in trainer.callbacks if isinstance(cb, MergeCheck) and cb.results), {})
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "RUN/checkpoints/last.ckpt"
        print(self.summary(export, reloaded, checked, ckpt))

    def summary(self, export: QuantizedExport, model, checked: dict[str, float], ckpt: str) -> str:
        disk = sum(p.stat().st_size for p in export.path.rglob("*") if p.is_file())
        layers = quant_layers(model)
        dense = sum(m.in_features * m.out_features for m in layers.values())
        fp16 = 2 * (dense + sum(p.numel() for p in model.parameters()))
        bits = next(iter(layers.values())).layout.bits if layers else 16
        mib = 1 << 20
        lines = ["", "── lowbit-ft demo ─────────────────────────────────────────────────────────",
                 f"merged INT{bits} model      {export.path.resolve()}",
                 f"  size on disk          {disk / mib:.1f} MiB (fp16: {fp16 / mib:.1f} MiB, "
                 f"{fp16 / disk:.1f}x larger)"]
        if checked:
            lines.append(f"  merge check           per-layer max rel. error {checked['layer/max_rel']:.2g}; merged vs "
                         f"adapter-on: max |Δlogit| {checked.get('merged/max_abs_logit', float('nan')):.2g}, top-1 "
                         f"agreement {checked.get('merged/top1_agreement', float('nan')):.3f}")
        lines.append(f"  reloaded from disk    AutoModelForCausalLM.from_pretrained (after import lowbit_ft): max "
                     f"|Δlogit| {self.figures['reloaded/max_abs_logit']:.2g} vs adapter-on (non-quantized tensors "
                     f"stored in {dtype_name(export.dtype)}), top-1 agreement "
                     f"{self.figures['reloaded/top1_agreement']:.3f}")
        for prompt, before, after in zip(self.prompts, self.before or [""] * len(self.prompts), self.after,
                                         strict=True):
            text = prompt["instruction"] + (f" {prompt['input']}" if prompt.get("input") else "")
            lines += [f"prompt                  {text}", f"  before fine-tuning    {before!r}",
                      f"  after, merged INT{bits}   {after!r}"]
        lines += [f"next                    lowbit-ft export --checkpoint {ckpt} --format gguf "
                  "--output out/demo-gguf   (or mlx, gptq, hf)",
                  f"                        lowbit-ft eval --model {export.path} --data "
                  "data/eval_dev/science_qa.jsonl",
                  f"                        lowbit-ft generate --model {export.path} --prompt \"…\""]
        return "\n".join(lines)
