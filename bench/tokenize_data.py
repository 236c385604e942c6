"""Tokenizing a conversation set once, in parallel, and reading it back from the cache (issue 28).

    python bench/tokenize_data.py                       # 100,000 conversations, num_proc 1 and 2, then the reload
    python bench/tokenize_data.py --records 5000        # a quick trial

Writes WORKDIR/chats.jsonl: synthetic conversations in the `messages` format (seeded; a system prompt in two of
three, one to three user → assistant turns of a few dozen words each), and WORKDIR/tokenizer: SmolLM2's tokenizer
(ChatML template) saved as files. For each --num_proc it empties a cache directory (LOWBIT_FT_CACHE) and times
`InstructionDataModule.tokenized("train")` — reading the file, checking every record, rendering it with the chat
template, labelling the assistant turns, saving the result — then times the same call of a new data module on
the same cache (the key from the file's stat and the tokenizer, then `datasets.load_from_disk`), as a second run
or another DDP rank would. The tokenizer is loaded before each timer starts (both runs need it). One process at a
time on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("river planet garden window silver rocket forest button candle dragon pencil mirror castle violin island "
         "quiet bright ancient gentle rapid hollow golden frozen distant curious humble eager").split()
SYSTEMS = ("You are a helpful assistant.", "Answer briefly and precisely.")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_conversations(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(records):
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 2 / 3 else []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng, rng.randint(6, 20)) + " Why?"})
                messages.append({"role": "assistant", "content": " ".join(sentence(rng, rng.randint(5, 15))
                                                                          for _ in range(rng.randint(1, 3)))})
            f.write(json.dumps({"messages": messages}) + "\n")


def timed_tokenize(data_path: Path, tokenizer: Path, cache: Path, num_proc: int) -> tuple[float, int]:
    from lowbit_ft.train.data import InstructionDataModule

    os.environ["LOWBIT_FT_CACHE"] = str(cache)
    data = InstructionDataModule(path=str(data_path), tokenizer=str(tokenizer), max_length=512,
                                 num_proc=None if num_proc == 1 else num_proc)
    data._tokenizer()
    start = time.perf_counter()
    tokens = data.tokenized("train")
    return time.perf_counter() - start, len(tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--records", type=int, default=100_000, help="conversations to write and tokenize")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2], help="tokenizing processes to time")
    parser.add_argument("--workdir", default="out/bench-tokenize", help="chats.jsonl, tokenizer/, caches go here")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    chats, tokenizer = work / "chats.jsonl", work / "tokenizer"
    if not chats.is_file() or sum(1 for _ in chats.open()) != args.records:
        write_conversations(chats, args.records)
    if not tokenizer.is_dir():
        from lowbit_ft.formats.load import load_tokenizer

        load_tokenizer("smollm2").save_pretrained(tokenizer)
    rows = []
    print(f"{args.records:,} conversations, {chats.stat().st_size / 1e6:.1f} MB; {os.cpu_count()} cores",
          flush=True)
    for num_proc in args.num_proc:
        cache = work / f"cache-{num_proc}"
        shutil.rmtree(cache, ignore_errors=True)
        first, n = timed_tokenize(chats, tokenizer, cache, num_proc)
        reload, n_again = timed_tokenize(chats, tokenizer, cache, num_proc)
        assert n == n_again == args.records, (n, n_again)
        rows.append({"num_proc": num_proc, "tokenize_s": round(first, 2), "reload_s": round(reload, 3),
                     "reload_share": round(reload / first, 4)})
        print(f"num_proc {num_proc}: tokenize {first:.1f} s, cached reload {reload:.3f} s "
              f"({100 * reload / first:.2f} % of it)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"records": args.records, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
