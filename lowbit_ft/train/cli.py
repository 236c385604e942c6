"""`lowbit-ft fit` / `validate`: LightningCLI over LowBitModule + InstructionDataModule, with the checks that
need no model (resume settings, the base's path) and the run directory every output goes to."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lowbit_ft.adapters import REGISTRY, save_adapters
from lowbit_ft.adapters.verify import MergeMismatchError
from lowbit_ft.callbacks.progress import ParameterLine, StepProgressBar
from lowbit_ft.formats.load import BUILTIN_SMOLLM2, check_source_family
from lowbit_ft.quiet import quiet_lightning
from lowbit_ft.records import BUILTIN_DEMO
from lowbit_ft.train.checkpoint import checkpoint_hparams, read_checkpoint
from lowbit_ft.train.data import InstructionDataModule
from lowbit_ft.train.module import LowBitModule, NonFiniteLossError
from lowbit_ft.train.preemption import StopOnSignal
from lowbit_ft.train.run_dir import last_checkpoint, place_outputs, release, run_directory

#: settings a resumed run may change (besides trainer.*: max_steps, logging, callbacks, devices, …): they do not
#: change what the adapters learn from the next step on. Every other model / data / plugin setting must match.
RESUMABLE_CHANGES = ("model.gradient_checkpointing", "data.num_workers", "data.num_proc")
#: what `validate` needs equal: the adapters' structure and scale (the rest is about training)
VALIDATE_COMPARES = ("model.adapter", "model.r", "model.alpha", "model.adapter_args", "model.targets")


def check_resume_config(ckpt_path: Path, config, subcommand: str) -> None:
    """Before anything loads: refuse a resume (or validate) whose settings differ from the checkpoint's, naming
    the key and both values. (LightningCLI would silently put the checkpoint's model.* over the command line.)
    model.base is checked by the base's fingerprint instead (it may have moved), data.path only if the
    recorded file still exists (else it moved), GPTQ's calibration file not at all (the fingerprint covers it)."""
    ckpt = read_checkpoint(ckpt_path, "--ckpt_path")
    model = config.model.as_dict()
    if model.get("adapter_args") and model.get("adapter") in REGISTRY:  # today's names, as checkpoint_hparams gives
        model["adapter_args"] = REGISTRY[model["adapter"]].current_names(model["adapter_args"])
    pairs = [(f"model.{k}", v, model.get(k)) for k, v in checkpoint_hparams(ckpt).items()
             if not k.startswith("_") and k != "base"]
    if subcommand == "fit":
        data = config.data.as_dict()
        pairs += [(f"data.{k}", v, data.get(k)) for k, v in ckpt.get("datamodule_hyper_parameters", {}).items()
                  if not k.startswith("_") and k != "tokenizer"
                  and not (k == "path" and v != BUILTIN_DEMO and not Path(str(v)).exists())]
    recorded = (ckpt.get("lowbit_base") or {}).get("spec")
    plugins = config.trainer.plugins if isinstance(config.trainer.plugins, list) else [config.trainer.plugins]
    for plugin in plugins:
        if recorded and getattr(plugin, "class_path", "").rsplit(".", 1)[-1] == "LowBitPrecision":
            from lowbit_ft.train.precision import LowBitPrecision

            current = LowBitPrecision(**plugin.init_args.as_dict()).spec.to_dict()
            pairs += [(f"trainer.plugins.{k}", v, current.get(k)) for k, v in recorded.items()
                      if k != "calibration_data"]
    for key, old, new in pairs:
        if key in RESUMABLE_CHANGES or (subcommand != "fit" and not key.startswith(VALIDATE_COMPARES)):
            continue
        if _canonical(old) != _canonical(new):
            raise ValueError(f"--ckpt_path: {key} is {old!r} in the checkpoint but {new!r} now: resume with the "
                             "checkpoint's settings, or start a new run (safe to change on resume: trainer.* such "
                             f"as max_steps, logging and callbacks; {', '.join(RESUMABLE_CHANGES)})")


def _canonical(value) -> str:
    """Tuples and lists alike (a checkpoint stores betas as a list), None / {} / [] alike (unset)."""
    return json.dumps(None if value in (None, {}, []) else value, sort_keys=True, default=str)


class LowBitCLI(LightningCLI):
    """LightningCLI for LowBitModule + InstructionDataModule; the tokenizer follows model.base."""

    #: the Lightning subcommands offered (lowbit_ft.cli.LIGHTNING_COMMANDS describes them for the overview).
    #: test / predict have no step here: held-out scoring is `lowbit-ft eval`, generation `generate`
    COMMANDS = ("fit", "validate")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LowBitCLI.COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base", "data.tokenizer")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would overwrite the parsed model.* with the checkpoint's hyper-parameters, silently
        # dropping command-line changes on resume; LowBitModule.on_load_checkpoint compares them instead and
        # refuses a difference by name, as check_resume_config does before anything loads
        return

    def before_instantiate_classes(self) -> None:
        """Checks that need no model, then (fit) the run directory every output goes to."""
        config = self.config[self.subcommand]
        base = config.model.base
        if base != BUILTIN_SMOLLM2 and not Path(base).exists():
            raise FileNotFoundError(f"model.base={base!r}: no such file or directory; give 'smollm2', a HF / GPTQ / "
                                    "lowbit directory, or a .gguf file")
        check_source_family(base)
        if config.get("ckpt_path") == "last":  # Lightning's "last" would look in the new run: take the newest
            found = last_checkpoint(config.trainer.default_root_dir)
            if found is None:
                raise FileNotFoundError(f"--ckpt_path last: no run under {config.trainer.default_root_dir} has a "
                                        "checkpoints/last.ckpt")
            config.ckpt_path = str(found)
        if config.get("ckpt_path"):
            check_resume_config(Path(config.ckpt_path), config, self.subcommand)
        if self.subcommand == "fit":
            self.run_dir, created = run_directory(config.trainer.default_root_dir, config.ckpt_path)
            place_outputs(config, self.run_dir)
            self._created_run = self.run_dir if created else None

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """What fit shows: our one-line parameter count instead of Lightning's table (which counts packed INT-b
        weights as int32 words), and a bar over optimizer steps unless the config brings a progress bar."""
        extra = config.get("callbacks") or []
        extra = extra if isinstance(extra, list) else [extra]
        if not any(isinstance(c, ProgressBar) for c in extra) and config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, StepProgressBar()]
        if not any(isinstance(c, ParameterLine) for c in extra):
            callbacks = [*callbacks, ParameterLine()]
        callbacks = [*callbacks, StopOnSignal()]  # SIGTERM / Ctrl-C: checkpoint, adapters, exit 143 / 130
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:
            if getattr(self, "_created_run", None) is not None:
                release(self._created_run)
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if getattr(self, "_created_run", None) is not None and self.trainer.is_global_zero:
                release(self._created_run)  # a fit that failed before writing anything leaves no empty run
            raise

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"run directory         {self.run_dir.resolve()}", flush=True)

    def after_fit(self) -> None:
        """Say where the results are: the run directory, the adapters, the resumable checkpoint, the logs."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        adapter_file = save_adapters(self.model.whole_model(), self.run_dir / "adapters.safetensors", overwrite=True)
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "(no checkpoint callback)"
        print(f"run directory         {self.run_dir.resolve()}")
        print(f"adapters              {adapter_file.resolve()}")
        print(f"checkpoint (resume)   {ckpt}")
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"logs                  {Path(trainer.logger.log_dir).resolve()}")


#: errors that are the user's input, shown as one line (not a traceback)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, MergeMismatchError,
               MisconfigurationException)


def run_lightning_cli(argv: list[str] | None) -> LowBitCLI:
    """fit / validate (argv None: the process's own arguments)."""
    quiet_lightning()
    return LowBitCLI(LowBitModule, InstructionDataModule, args=argv, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"exit_on_error": False},
                     trainer_defaults={"enable_model_summary": False})  # ParameterLine instead
