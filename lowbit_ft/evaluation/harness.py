"""Bridge to EleutherAI's lm-evaluation-harness: its tasks (MMLU, HellaSwag, ARC, … from your local
dataset cache, or your own task YAMLs) on any model lowbit-ft holds in memory — adapters on, merged
low bit, or dense. The model is handed over as an object (`HFLM(pretrained=model)`), so nothing is
re-loaded by name and the packed weights stay packed.

    from lowbit_ft.evaluation.harness import run_harness
    results = run_harness(model, tokenizer, ["arc_easy"], num_fewshot=0)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the lm-eval bridge needs lm-evaluation-harness: pip install 'lowbit-ft[eval]' "
                          "(or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def harness_model(model: nn.Module, tokenizer, batch_size: int = 8):
    """Wrap a loaded causal LM (a transformers model, with or without lowbit-ft adapters) as an
    lm-eval `HFLM`, for users who call `lm_eval.simple_evaluate` themselves."""
    _, HFLM, _ = _lm_eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_harness(model: nn.Module, tokenizer, tasks: list[str], include_path: str | Path | None = None,
                include_defaults: bool = True, num_fewshot: int | None = None, limit: int | None = None,
                batch_size: int = 8) -> dict:
    """Run lm-eval `tasks` on the model and return lm-eval's per-task results ({task: {metric: value}}).

    include_path: a folder of extra task YAMLs (e.g. a local JSON task); include_defaults=False skips
    indexing lm-eval's thousands of built-in tasks when only local ones are used."""
    lm_eval, _, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path}: not a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks {unknown}: lm-eval knows no such task; check the name (lm-eval ls tasks) or "
                         "add its YAML folder with --include_path")
    try:
        output = lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size), tasks=list(tasks),
                                         task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                         log_samples=False)
    except Exception as err:
        if not _dataset_unavailable(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"--tasks {list(tasks)}: lm-eval could not load a task's dataset ({type(err).__name__}: "
                         f"{first[:160]}); offline, it must already be in the Hugging Face datasets cache: run "
                         "once online, or use a local task with --include_path") from None
    return output["results"]


def _dataset_unavailable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a dataset that could not be fetched: offline, or no such dataset."""
    while err is not None:
        module = type(err).__module__
        if isinstance(err, ConnectionError) or module.startswith(("datasets", "huggingface_hub", "requests")):
            return True
        err = err.__cause__ or err.__context__
    return False
