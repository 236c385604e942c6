"""The `lowbit-ft` command line: a light dispatcher. `lowbit-ft --help` imports nothing heavy; a command
imports what it needs when it runs (fit / validate: `lowbit_ft.train.cli`; the others: `lowbit_ft.commands`,
typed functions whose docstrings are their --help)."""

from __future__ import annotations

import errno
import inspect
import re
import signal
import sys
from argparse import ArgumentError

from lowbit_ft.config_files import config_problem
from lowbit_ft.config_files import install as strict_configs
from lowbit_ft.hostmem import return_freed_memory

LIGHTNING_COMMANDS = {
    "fit": "train adapters on a low-bit base: lowbit-ft fit --config recipes/quickstart.yaml",
    "validate": "run the validation loop on a checkpoint (--ckpt_path)",
}
#: the first line of each command function's docstring in lowbit_ft.commands (a test keeps them equal), here
#: so that the overview needs no import
PROJECT_COMMANDS = {
    "quantize": "Quantize a model's linear layers to packed INT-b and report size and error.",
    "export": "Merge adapters into the low-bit base and write a deployable model.",
    "generate": "Answer prompts with a model (greedy): a fit checkpoint, an exported directory, a .gguf or 'smollm2'.",
    "eval": "Score a model on local multiple-choice tasks (log-likelihood) and, optionally, perplexity.",
    "harness": "Run lm-evaluation-harness tasks (MMLU, HellaSwag, ARC, … or local YAMLs) on a lowbit-ft model.",
}
LIST_OPTIONS = ("--data", "--prompt")  # repeatable: each occurrence adds one item


def overview() -> str:
    names = ",".join([*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])
    lines = [f"usage: lowbit-ft {{{names}}} [--config CONFIG] [options]", "",
             "lowbit-ft: fine-tune LLaMA-family models in INT2/3/4/8 with adapters that merge back exactly.", "",
             "commands (add --help after one for all its options):"]
    lines += [f"  {name:<10} {text}" for name, text in {**LIGHTNING_COMMANDS, **PROJECT_COMMANDS}.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lowbit-ft` console script."""
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
    user_errors: tuple[type[BaseException], ...] = ()
    return_freed_memory()  # streamed models drop a block at a time: that memory must leave the process
    strict_configs()  # a key given twice, an alias, an oversized config: refused by every parse
    problem = config_problem(argv)  # and before the heavy imports, for --config files
    if problem:
        print(f"lowbit-ft: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if argv[0] in PROJECT_COMMANDS:
            if from_shell:
                signal.signal(signal.SIGTERM, _unwind_on_sigterm)
            from jsonargparse import CLI

            from lowbit_ft.commands import COMMANDS, USER_ERRORS

            user_errors = USER_ERRORS
            # `--data a --data b` appends (jsonargparse would read a lone list value as a file of items)
            argv = [f"{a}+={argv[i + 1]}" if a in LIST_OPTIONS and i + 1 < len(argv) else a
                    for i, a in enumerate(argv) if not (i > 0 and argv[i - 1] in LIST_OPTIONS)]
            argv = with_bare_flags(COMMANDS[argv[0]], argv)
            CLI(COMMANDS, args=argv, as_positional=False, description=overview())
        else:
            from lowbit_ft.train.cli import USER_ERRORS, run_lightning_cli

            user_errors = USER_ERRORS
            run_lightning_cli(None if from_shell else argv)
    except ArgumentError as err:
        print(f"lowbit-ft: error: {innermost_error(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Terminated as stop:
        print(f"lowbit-ft: stopped by SIGTERM during {argv[0]}; its partial output was removed", file=sys.stderr)
        raise SystemExit(stop.code) from None
    except Exception as err:
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRORS:
            print(f"lowbit-ft: error: {os_error_line(err)}", file=sys.stderr)
            raise SystemExit(1) from None
        if not isinstance(err, user_errors):
            raise
        # user errors are one line, not a traceback (nor jsonargparse's report on every union alternative)
        hint = " (trainer.accelerator: no such device here; use auto or cpu)" \
            if type(err).__name__ == "MisconfigurationException" and "backend" in str(err) else ""
        print(f"lowbit-ft: error: {remote_code_refused(innermost_error(str(err)))}{hint}", file=sys.stderr)
        raise SystemExit(1 if type(err).__name__ == "NonFiniteLossError" else 2) from None


#: what the machine, not the command line, refused: one line naming the path and the way out, no traceback
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free space there, or write somewhere with room",
    errno.EDQUOT: "free space in your quota, or write somewhere else",
    errno.EROFS: "write somewhere writable (--output, trainer.default_root_dir, LOWBIT_FT_CACHE)",
    errno.EACCES: "give yourself permission there, or write somewhere else",
    errno.EPERM: "give yourself permission there, or write somewhere else",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EFBIG: "the file system or the process's file size limit (ulimit -f) caps files there: write somewhere "
                 "else, or raise the limit",
}


def os_error_line(err: OSError) -> str:
    """An OSError as one line: the path, what the system said, and the fix."""
    path = f"{err.filename}: " if err.filename is not None else ""
    return f"{path}{err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)}): {ENVIRONMENT_ERRORS[err.errno]}"


class Terminated(SystemExit):
    """Raised by SIGTERM in quantize / export / eval / generate: Python unwinds instead of dying at once (its
    default), so every writer's `finally` removes its partial output before the process ends."""


def _unwind_on_sigterm(signum, frame) -> None:
    raise Terminated(128 + signum)


_REMOTE_CODE = re.compile(r"The repository (?P<path>.+?) contains custom code .*trust_remote_code")


def remote_code_refused(message: str) -> str:
    """transformers' refusal of a directory's own code (every load passes trust_remote_code=False) says to pass
    trust_remote_code=True, which lowbit-ft has no option for: say what it is instead."""
    match = _REMOTE_CODE.search(message)
    if match is None:
        return message
    return (f"{match['path']}: this model or tokenizer exists only as Python code inside its directory (auto_map); "
            "lowbit-ft never runs a model directory's code: use a model whose architecture transformers ships")


def with_bare_flags(command, argv: list[str]) -> list[str]:
    """`--overwrite` alone means `--overwrite true` (as users write flags); jsonargparse wants the value."""
    flags = {f"--{name}" for name, p in inspect.signature(command).parameters.items() if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


# what jsonargparse says about every alternative of a union type it tried; the cause is the other line
_PARSER_REPORT = ("Does not validate against", "Subtypes:", "Errors:", "Not a valid subclass", "Subclass types expect",
                  "a class path", "a dict", "Given value", "Expected a", "Import path ")


def innermost_error(message: str) -> str:
    """One line: a one-line message as it is; from a multi-line parser report, the line that says what is wrong
    (e.g. "LowBitPrecision bits=5 is not supported…" under 40 lines of union alternatives)."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines() if line.strip()]
    causes = [i for i, line in enumerate(lines) if not line.startswith(_PARSER_REPORT)]
    if len(causes) == len(lines) or not causes:  # not a union report (e.g. a YAML error): all of it, one line
        return " ".join(lines) or message
    cause = lines[causes[-1]]
    if cause.endswith(":") and causes[-1] + 1 < len(lines):  # 'Parser key "x":' — the reason is the next line
        reason = lines[causes[-1] + 1]
        if reason.startswith("Does not validate against"):  # a plain union: what was given and what it takes
            reason = _union_mismatch(lines) or reason
        cause = f"{cause} {reason}"
    return cause


def _union_mismatch(lines: list[str]) -> str | None:
    """ "VALUE is a TYPE; it takes A or B" from a union report's Subtypes / Given value lines."""
    found = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines
             if line.startswith(("Subtypes:", "Given value type:", "Given value:"))}
    if len(found) < 3:
        return None
    name = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
    subtypes = re.split(r",\s*(?![^\[]*\])", name.sub(r"\1", found["Subtypes"])[1:-1])  # commas outside [...]
    takes = [t.replace("NoneType", "null") for t in subtypes]
    given = name.sub(r"\1", found["Given value type"])
    hint = " (a list is written [a, b])" if any(t.startswith("list") for t in takes) else ""
    return f"{found['Given value']} is a {given}; it takes {' or '.join(takes)}{hint}"
