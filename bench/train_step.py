"""Training-step speed and memory: QA-LoRA on our packed INT4 base against LoRA peers, in one process.

    python bench/train_step.py                 # CUDA: 4 LLaMA-7B-shaped layers (random weights); peers: LoRA on
                                               # a frozen bf16 base, QLoRA (bitsandbytes NF4) where it installs
    python bench/train_step.py --smollm2       # CPU: the real SmolLM2-135M, QA-LoRA on packed INT4 g64 (the
                                               # torch reference kernels) vs PEFT LoRA on the dense fp32 model
    python bench/train_step.py --smoke         # tiny shapes, any machine: checks the script runs

Reported: tokens/s of forward + backward + AdamW step, and peak memory (CUDA: allocator peak; CPU: peak
resident set above the level before the model was built, sampled every 5 ms), each as a ratio to the
peers measured in the same process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit_ft import BlockLayout, QuantLinear  # noqa: E402
from lowbit_ft.adapters import attach  # noqa: E402
from lowbit_ft.adapters.lora import LoRA  # noqa: E402
from lowbit_ft.quant.modules import set_submodule, target_linears  # noqa: E402


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


SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_smollm2(kind: str, r: int) -> nn.Module:
    """SmolLM2-135M for the CPU comparison: our QA-LoRA on packed INT4 g64, or PEFT's LoRA on dense fp32."""
    from lowbit_ft import load_model, quantize_model

    model, _ = load_model("smollm2")
    if kind == "qa_lora_int4":
        quantize_model(model, BlockLayout.group(bits=4, group_size=64))
        return attach(model, "qa_lora", r=r, alpha=16)
    from peft import LoraConfig, get_peft_model  # the bench extra: pip install -e ".[bench]"

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=SMOLLM2_TARGETS))


class PeakRSS:
    """Peak resident set size above the level at entry, sampled in a thread (CPU memory of one peer)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:  # hand freed heap pages back to the OS, so the previous peer's memory does not hide this one's
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def training_step(model: nn.Module, batch: int, seq: int, device: str,
                  autocast: torch.dtype | None = torch.bfloat16):
    """A closure running one forward + backward + AdamW step on a fixed random batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def step():
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(model: nn.Module, batch: int, seq: int, steps: int, device: str) -> tuple[float, float]:
    step = training_step(model, batch, seq, device)
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
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 512; --smollm2: 256)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; --smollm2: 4 per peer)")
    parser.add_argument("--r", type=int, help="adapter rank (default 64; --smollm2: 16)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step: checks the script runs")
    parser.add_argument("--smollm2", action="store_true",
                        help="CPU: SmolLM2-135M, QA-LoRA INT4 g64 vs PEFT LoRA fp32")
    args = parser.parse_args()
    defaults = (256, 4, 16) if args.smollm2 else (512, 10, 64)
    for name, value in zip(("seq", "steps", "r"), defaults, strict=True):
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if args.smollm2:
        smollm2_main(args)
        return
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


def smollm2_main(args: argparse.Namespace) -> None:
    """Both peers live side by side and their timed steps alternate, so drift of a shared 2-core machine
    (other load, clock, cache) falls on both alike; memory is measured per peer over build + first step."""
    batch, seq, r, steps = args.batch, args.seq, args.r, args.steps
    print(f"device: cpu ({torch.get_num_threads()} threads)   torch {torch.__version__}   SmolLM2-135M, batch {batch} "
          f"× {seq} tokens, r = {r}, fp32, {steps} timed steps each (alternating) after 1 warm-up")
    kinds = ("qa_lora_int4", "peft_lora_fp32")
    step, memory, seconds = {}, {}, dict.fromkeys(kinds, 0.0)
    for kind in kinds:
        with PeakRSS() as rss:
            step[kind] = training_step(build_smollm2(kind, r), batch, seq, "cpu", autocast=None)
            step[kind]()  # warm-up, inside the memory window: a training step's peak
        memory[kind] = rss.gib
    for _ in range(steps):
        for kind in kinds:
            start = time.perf_counter()
            step[kind]()
            seconds[kind] += time.perf_counter() - start
    speed = {kind: batch * seq * steps / seconds[kind] for kind in kinds}
    for kind in kinds:
        print(f"{kind:<15} {speed[kind]:>8.1f} tokens/s   peak RSS +{memory[kind]:.2f} GiB", flush=True)
    ours, peer = kinds
    print(f"{ours} vs {peer}: {speed[ours] / speed[peer]:.2f}x tokens/s, {memory[ours] / memory[peer]:.2f}x peak RSS")


if __name__ == "__main__":
    main()
