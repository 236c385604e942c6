"""The report of experiments/reproduce.py, from its rows alone: OUTPUT/rows.jsonl read back as typed `RowKey`
rows, and from them OUTPUT/results.md (the scores; merged vs adapter-on item by item; every deployable row
against LoRA + GPTQ with an exact sign test; the spread over seeds; the training loss of every run),
OUTPUT/accuracy_vs_bits.png and OUTPUT/loss_curves.png.

    python experiments/reproduce.py --report-only --output OUTPUT    # rebuild them without rescoring
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from lowbit_ft.evaluation.multiple_choice import read_task

FAMILIES = ("base", "lora", "qa_lora", "qa_hira", "q_bara")  # row groups --only picks from
METRIC = "acc"  # summed log-likelihood, the shared data README's headline column
DEFAULT_SEED = 42  # --seeds' default: the rows of other seeds carry theirs in their label

STAGES = {  # stage → how the row's model is deployed
    "16-bit": "the float model", "GPTQ base": "the GPTQ base, no fine-tuning", "merged fp16": "merged into fp16",
    "+ RTN": "merged fp16, then RTN", "+ GPTQ": "merged fp16, then GPTQ", "adapter-on": "base + adapters",
    "merged": "merged into the low-bit zeros",
}
NAMES = {"base": "", "lora": "LoRA", "qa_lora": "QA-LoRA", "qa_hira": "QA-HiRA", "q_bara": "Q-BaRA"}


@dataclasses.dataclass(frozen=True)
class RowKey:
    """What a row is. `base` is the quantizer of the low-bit base it was trained on (or is), `init` the
    adapters' start, `seed` the training seed (None for rows without training)."""

    method: str  # one of FAMILIES
    stage: str  # one of STAGES
    bits: int
    base: str | None = None  # "gptq" | "rtn"
    init: str = "zero"
    seed: int | None = None

    @property
    def notes(self) -> str:
        notes = [f"{self.base.upper()} base"] if self.base == "rtn" else []
        notes += [f"{self.init} start"] if self.init != "zero" else []
        notes += [f"seed {self.seed}"] if self.seed not in (None, DEFAULT_SEED) else []
        return ", ".join(notes)

    @property
    def run(self) -> str:
        """The fine-tuning run the row comes from, e.g. 'QA-LoRA (RTN base, quant_error start)'."""
        return f"{NAMES[self.method]} ({self.notes})" if self.notes else NAMES[self.method]

    @property
    def label(self) -> str:
        """The table's name for the row, e.g. 'QA-LoRA, merged (RTN base, quant_error start)'."""
        if self.method == "base":
            return "16-bit base" if self.stage == "16-bit" else "GPTQ base"
        name = NAMES[self.method]
        text = f"{name} {self.stage}" if self.stage.startswith("+") else f"{name}, {self.stage}"
        return f"{text} ({self.notes})" if self.notes else text

    def paired(self, stage: str) -> RowKey:
        return dataclasses.replace(self, stage=stage)


def read_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    return [{**row, "key": RowKey(**row["key"])} for row in rows]


def value_of(row: dict, key: str) -> float:
    return row["perplexity"] if key == "perplexity" else row["tasks"][key][METRIC]


def merge_lines(rows: list[dict], tasks: list[str]) -> list[str]:
    """Merged vs adapter-on, item by item: the exact merge must pick the same answer everywhere."""
    by_key = {r["key"]: r for r in rows}
    lines = ["| merged vs adapter-on | bits | " + " | ".join(f"{t} same picks" for t in tasks) + " | ppl rel. diff |",
             "|" + "---|" * (len(tasks) + 3)]
    for key, on in by_key.items():
        merged = by_key.get(key.paired("merged"))
        if key.stage != "adapter-on" or merged is None:
            continue
        same = [sum(a == b for a, b in zip(on["tasks"][t]["predictions"], merged["tasks"][t]["predictions"],
                                           strict=True)) for t in tasks]
        cells = " | ".join(f"{k}/{on['tasks'][t]['n']}" for k, t in zip(same, tasks, strict=True))
        diff = abs(merged["perplexity"] - on["perplexity"]) / on["perplexity"]
        lines.append(f"| {key.paired('merged').label} | {key.bits} | {cells} | {diff:.1e} |")
    return [*lines, ""] if len(lines) > 2 else []


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign (McNemar) test p-value of `wins` against `losses` discordant items."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_lines(rows: list[dict], gold: dict[str, list[int]]) -> list[str]:
    """Every deployable row (merged or base) against LoRA + GPTQ of the same bits and seed on the same items,
    all tasks pooled: the items only one of the two gets right, and whether that split could be chance
    (at n = 100 a task, accuracy moves by about ±0.05 on noise alone)."""
    by_key = {r["key"]: r for r in rows}
    lines = ["| vs LoRA + GPTQ (same bits, seed) | bits | only method right | only baseline right | sign-test p |",
             "|---|---|---|---|---|"]
    for key, row in by_key.items():
        seed = key.seed if key.seed is not None else DEFAULT_SEED
        base = by_key.get(RowKey("lora", "+ GPTQ", key.bits, "gptq", seed=seed))
        if base is None or key == base["key"] or key.stage == "adapter-on":
            continue
        wins = losses = 0
        for t, answers in gold.items():
            for mine, theirs, right in zip(row["tasks"][t]["predictions"], base["tasks"][t]["predictions"], answers,
                                           strict=True):
                wins += mine == right and theirs != right
                losses += theirs == right and mine != right
        lines.append(f"| {key.label} | {key.bits} | {wins} | {losses} | {sign_test(wins, losses):.2f} |")
    return [*lines, ""] if len(lines) > 2 else []


def training_runs(rows: list[dict]) -> dict[tuple[str, int, str], list[float]]:
    """(run, base bits, method) → per-step training loss, once per fine-tuning run (a seed's LoRA run on the
    INT4 base is shared by all its LoRA rows)."""
    runs: dict[tuple[str, int, str], list[float]] = {}
    for row in rows:
        if row.get("train_loss"):
            key = row["key"]
            runs.setdefault((key.run, 4 if key.method == "lora" else key.bits, key.method), row["train_loss"])
    return runs


def loss_lines(rows: list[dict]) -> list[str]:
    """Training loss, mean of the first and of the last five steps, of every fine-tuning run."""
    lines = ["| fine-tuning run | base bits | loss, first 5 steps | loss, last 5 steps |", "|---|---|---|---|"]
    for (run, bits, _), losses in training_runs(rows).items():
        lines.append(f"| {run} | {bits} | {sum(losses[:5]) / len(losses[:5]):.3f} | "
                     f"{sum(losses[-5:]) / len(losses[-5:]):.3f} |")
    return [*lines, ""] if len(lines) > 2 else []


def plot_losses(rows: list[dict], out: Path, plt) -> None:
    """loss_curves.png: every run's training loss (mean over a 5-step window), one panel per base bit width,
    LoRA's runs (on the INT4 base) drawn in every panel as the reference."""
    runs = training_runs(rows)
    panels = sorted({bits for _, bits, method in runs if method != "lora"} or {4}, reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, bits in zip(axes[0], panels, strict=True):
        for (run, run_bits, method), losses in runs.items():
            if method == "lora" or run_bits == bits:
                windows = [losses[max(0, i - 4): i + 1] for i in range(len(losses))]
                ax.plot(range(1, len(losses) + 1), [sum(w) / len(w) for w in windows],
                        label=f"{run}, INT{run_bits} base")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (5-step mean)")
        ax.set_title(f"fine-tuning on INT{bits} bases")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)


def seed_lines(rows: list[dict]) -> list[str]:
    """Rows trained with more than one seed: mean and spread (min–max) of the perplexity and the MC mean."""
    groups: dict[RowKey, list[dict]] = {}
    for row in rows:
        if row["key"].seed is not None and row["key"].stage != "adapter-on":  # deployable rows
            groups.setdefault(dataclasses.replace(row["key"], seed=None), []).append(row)
    lines = ["| over seeds | bits | seeds | held-out ppl mean (min–max) | MC mean (min–max) |", "|---|---|---|---|---|"]
    for key, group in groups.items():
        if len(group) < 2:
            continue
        ppl = [r["perplexity"] for r in group]
        mc = [sum(r["tasks"][t][METRIC] for t in r["tasks"]) / len(r["tasks"]) for r in group]
        lines.append(f"| {dataclasses.replace(key, seed=DEFAULT_SEED).label} | {key.bits} | {len(group)} | "
                     f"{sum(ppl) / len(ppl):.2f} ({min(ppl):.2f}–{max(ppl):.2f}) | "
                     f"{sum(mc) / len(mc):.3f} ({min(mc):.3f}–{max(mc):.3f}) |")
    return [*lines, ""] if len(lines) > 2 else []


def table_order(row: dict) -> tuple:
    """Widest bits first; within a bit width by method, then run (base, start, seed), then stage."""
    key = row["key"]
    return (-key.bits, FAMILIES.index(key.method), key.init != "zero", key.base or "", key.seed or 0,
            list(STAGES).index(key.stage))


def write_report(rows: list[dict], tasks: list[str], eval_data: str | Path, out: Path) -> None:
    """results.md (the tables), accuracy_vs_bits.png (one panel per task plus perplexity) and loss_curves.png in
    `out`, for `tasks` (their gold answers read from EVAL_DATA/<task>.jsonl)."""
    rows, tasks = sorted(rows, key=table_order), list(tasks)
    header = "| method | bits | " + " | ".join(tasks) + " | held-out response ppl |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    chance = "| chance | | " + " | ".join(f"{rows[0]['tasks'][t]['chance']:.3f}" for t in tasks) + " | |"
    for row in rows:
        accs = " | ".join(f"{row['tasks'][t][METRIC]:.3f}" for t in tasks)
        lines.append(f"| {row['key'].label} | {row['key'].bits} | {accs} | {row['perplexity']:.2f} |")
    n = ", ".join(f"{t} n={rows[0]['tasks'][t]['n']}" for t in tasks)
    gold = {t: [item["answer"] for item in read_task(Path(eval_data) / f"{t}.jsonl")][: rows[0]["tasks"][t]["n"]]
            for t in tasks}
    text = [*lines, chance, "", f"Accuracy by summed log-likelihood ({n}).", "", *merge_lines(rows, tasks),
            *paired_lines(rows, gold), *seed_lines(rows), *loss_lines(rows)]
    (out / "results.md").write_text("\n".join(text))
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.8))
    low_bit = sorted({r["key"].bits for r in rows if r["key"].bits < 16})
    methods = list(dict.fromkeys(r["key"].label for r in rows if r["key"].bits < 16 and r["key"].stage != "adapter-on"))
    for ax, key in zip(axes, [*tasks, "perplexity"], strict=True):
        for method in methods:
            points = sorted((r["key"].bits, value_of(r, key)) for r in rows if r["key"].label == method)
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        for row, style in zip([r for r in rows if r["key"].bits == 16], ("k--", "k:"), strict=False):
            ax.axhline(value_of(row, key), color=style[0], linestyle=style[1:], label=row["key"].label)
        if key == "perplexity":
            ax.set_yscale("log")
        else:
            ax.axhline(rows[0]["tasks"][key]["chance"], color="grey", linewidth=0.8, label="chance")
        ax.set_xticks(low_bit)
        ax.set_xlabel("bits")
        ax.set_title("held-out response perplexity" if key == "perplexity" else f"{key} (acc)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bits.png", dpi=120)
    if training_runs(rows):
        plot_losses(rows, out, plt)
