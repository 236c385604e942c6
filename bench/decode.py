"""End-to-end decode speed of a merged low-bit model through transformers' `generate`, against the same
model in bf16, in one process.

    python bench/decode.py                   # CUDA: LLaMA-7B-shaped (random weights), INT4 g128, 8 layers
    python bench/decode.py --layers 32 --bits 2 --compile
    python bench/decode.py --smoke           # tiny model on any machine: checks the script runs

The low-bit model is quantized (RTN), given a QA-LoRA adapter with random non-zero weights and merged,
so its zeros are fractional, as in a real fine-tuned model. Greedy decoding of `--new_tokens` tokens after
a short prompt, batch 1; reported: tokens/s of each, their ratio, and (CUDA) peak memory. `--compile`
also times both under `torch.compile` with a static KV cache.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit_ft import BlockLayout, quantize_model  # noqa: E402
from lowbit_ft.adapters import adapted_layers, attach, merge  # noqa: E402


def build(config: LlamaConfig, device: str, layout: BlockLayout | None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    if layout is not None:
        quantize_model(model, layout)
        attach(model, "qa_lora", r=16, alpha=16)
        for layer in adapted_layers(model).values():
            torch.nn.init.normal_(layer.adapter.lora_B, std=1e-3)  # a trained adapter is not zero
        merge(model)
    return model


def tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if compiled:
        kwargs["cache_implementation"] = "static"
    model.generate(prompt, **kwargs)  # warm-up: autotuning, compilation, allocator
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync()
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of LLaMA-7B shape")
    parser.add_argument("--bits", type=int, default=4, help="code width of the low-bit model")
    parser.add_argument("--group_size", type=int, default=128, help="GPTQ group size (layout (1, g))")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per timed call")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tokens: checks the script runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512)
        args.new_tokens, args.group_size = 4, 64
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    seeded = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device, generator=seeded)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}   torch {torch.__version__}   "
          f"{config.num_hidden_layers} layers, INT{args.bits} g{args.group_size} merged QA-LoRA vs bf16, batch 1, "
          f"{args.new_tokens} new tokens")
    modes = [False, True] if args.compile else [False]
    results = {}
    for name, layout in (("bf16", None), (f"int{args.bits}", BlockLayout.group(args.bits, args.group_size))):
        model = build(config, device, layout)
        for compiled in modes:
            if compiled:
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            speed = tokens_per_s(model, prompt, args.new_tokens, compiled)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            results[(name, compiled)] = speed
            print(f"{name:<6} {'compiled' if compiled else 'eager':<9} {speed:>9.1f} tokens/s   peak {peak:.2f} GiB",
                  flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    for compiled in modes:
        ratio = results[(f"int{args.bits}", compiled)] / results[("bf16", compiled)]
        print(f"int{args.bits} vs bf16 ({'compiled' if compiled else 'eager'}): {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
