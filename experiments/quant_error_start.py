"""The quant_error start before any training step, on SmolLM2-135M: held-out response perplexity of the RTN
(and, for contrast, GPTQ) INT-b base with its adapters at zero and at the quant_error start.

    python experiments/quant_error_start.py --train-data TRAIN.jsonl --bits 3 2    # ~10 min on 2 CPU cores

Same data as experiments/reproduce.py (give it the same --train-data): calibration on the first records of the
seeded shuffle of TRAIN.jsonl (the training records), perplexity on records from its tail (never trained on)."""

from __future__ import annotations

import argparse
import copy
import time

import torch
from reproduce import record_text, split_records

from lowbit_ft import BlockLayout, quantize_model
from lowbit_ft.adapters import attach, merge
from lowbit_ft.adapters.quant_error import init_from_quant_error
from lowbit_ft.evaluation.multiple_choice import perplexity
from lowbit_ft.formats.load import load_model
from lowbit_ft.quant.convert import dequantize_model
from lowbit_ft.records import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-data", required=True,
                        help="Alpaca .jsonl of experiments/reproduce.py's --train-data (natural-instructions' "
                             "ni_train.jsonl): calibration and held-out perplexity records")
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--r", type=int, default=16, help="QA-LoRA rank (its start is the rank-r truncation)")
    parser.add_argument("--calibration-records", type=int, default=64)
    parser.add_argument("--perplexity-samples", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    calibration, held_out = split_records(read_records(args.train_data), args.calibration_records,
                                          args.perplexity_samples)
    texts = list(map(record_text, calibration))
    batches = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][: args.max_length]]) for t in texts]
    concat = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][: 16 * 256]
    gptq_calibration = torch.tensor(concat).reshape(16, 256)

    def ppl(m) -> float:
        m = dequantize_model(copy.deepcopy(m))
        return perplexity(m, tokenizer, held_out, args.max_length)["response"]

    print(f"16-bit base: {ppl(model):.2f}", flush=True)
    print("| base | zero start | quant_error, QA-HiRA (1, g) full | quant_error, QA-LoRA r = "
          f"{args.r} | share of the calibration output error cancelled (QA-HiRA / QA-LoRA) |")
    print("|---|---|---|---|---|")
    for bits in args.bits:
        for method in args.methods:
            started = time.perf_counter()
            layout = BlockLayout.group(bits, args.group_size)
            base = quantize_model(copy.deepcopy(model), layout, method,
                                  calibration=gptq_calibration if method == "gptq" else None, progress=False)
            cells, shares = [f"{ppl(base):.3g}"], []
            for adapter, hparams in (("qa_hira", {}), ("qa_lora", {"r": args.r})):
                adapted = attach(copy.deepcopy(base), adapter, **hparams)
                removed = init_from_quant_error(adapted, model, batches, progress=False)
                shares.append(f"{sum(removed.values()) / len(removed):.0%}")
                cells.append(f"{ppl(merge(adapted)):.3g}")  # merged: the start is exact in low bit too
            print(f"| {method.upper()} INT{bits} g{args.group_size} | {' | '.join(cells)} | {' / '.join(shares)} |"
                  f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
