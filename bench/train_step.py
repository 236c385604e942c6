"""Training-step speed and memory of a LLaMA-7B-shaped stack (random weights): QA-LoRA on our packed INT4
base vs LoRA on a frozen bf16 base vs QLoRA (bitsandbytes NF4 + LoRA, when bitsandbytes is installed).

    python bench/train_step.py                 # on a CUDA GPU (4 decoder layers of LLaMA-7B by default)
    python bench/train_step.py --smoke         # tiny shapes, any machine

Reported: tokens/s of forward + backward + AdamW step, and peak memory, each as a ratio to the peers
measured in the same process.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit_ft import BlockLayout, QuantLinear  # noqa: E402
from lowbit_ft.adapters import attach  # noqa: E402
from lowbit_ft.adapters.lora import LoRA  # noqa: E402
from lowbit_ft.convert import set_submodule, target_linears  # noqa: E402


class DenseWithLoRA(nn.Module):
    """A frozen dense (or bitsandbytes) linear plus our LoRA adapter: the bf16-LoRA and QLoRA peers."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapter = LoRA(in_features, out_features, BlockLayout(4, 1, 1), r, alpha)  # LoRA ignores the layout

    def forward(self, x):
        return self.base(x) + self.adapter(x)


def build(kind: str, config: LlamaConfig, device: str, r: int) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    for name in target_linears(model):
        linear = model.get_submodule(name)
        i, o = linear.in_features, linear.out_features
        if kind == "qa_lora_int4":  # random codes / scales / zeros: speed does not depend on their values
            layer = QuantLinear(i, o, BlockLayout(4, 1, 32), device=device)
            layer.qweight.random_(-(2**31), 2**31 - 1)
            layer.scales.uniform_(1e-3, 2e-3)
            layer.zeros.fill_(8)
            set_submodule(model, name, layer)
        elif kind == "bf16_lora":
            set_submodule(model, name, DenseWithLoRA(linear, i, o, r, 16).to(device))
        else:  # qlora_nf4
            import bitsandbytes as bnb

            nf4 = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            nf4.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            set_submodule(model, name, DenseWithLoRA(nf4.to(device), i, o, r, 16).to(device))
        del linear
    if kind == "qa_lora_int4":
        attach(model, "qa_lora", r=r, alpha=16)
    for module in model.modules():
        if isinstance(module, LoRA):
            module.requires_grad_(True)
    return model


def measure(model: nn.Module, batch: int, seq: int, steps: int, device: str) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: autotuning, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return batch * seq * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of LLaMA-7B shape")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--r", type=int, default=64, help="adapter rank")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step: checks the script runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512)
        args.batch, args.seq, args.steps, args.r = 1, 16, 1, 4
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}   torch {torch.__version__}   "
          f"{config.num_hidden_layers} layers, batch {args.batch} × {args.seq} tokens, r = {args.r}")
    results = {}
    for kind in ("qa_lora_int4", "bf16_lora", "qlora_nf4"):
        try:
            model = build(kind, config, device, args.r)
        except ImportError as err:
            print(f"{kind:<14} not measured: {err}")
            continue
        results[kind] = measure(model, args.batch, args.seq, args.steps, device)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{kind:<14} {results[kind][0]:>10.0f} tokens/s   peak {results[kind][1]:.2f} GiB", flush=True)
    ours = results["qa_lora_int4"]
    for peer in ("bf16_lora", "qlora_nf4"):
        if peer in results:
            print(f"qa_lora_int4 vs {peer}: {ours[0] / results[peer][0]:.2f}x tokens/s, "
                  f"{ours[1] / results[peer][1]:.2f}x peak memory")


if __name__ == "__main__":
    main()
