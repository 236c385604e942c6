import errno
import os
import subprocess
import sys

import pytest

from lowbit_ft import load_quantized
from lowbit_ft.cli import main
from lowbit_ft.quant.modules import quant_layers

from .conftest import make_tiny_llama


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(path)
    return path


def test_quantize_prints_report_and_writes_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--output", str(out)])
    text = capsys.readouterr().out
    for line in ("INT4 (1×32 blocks)", "quantized linears     14 of 14", "bytes / param", "rel. logit error",
                 "reloaded max |Δlogit| 0", f"saved (gptq_v2)       {out.resolve()}"):
        assert line in text, line
    assert len(quant_layers(load_quantized(out))) == 14


@pytest.mark.parametrize("args,message", [
    (["--bits", "5"], "bits=5 is not supported: use one of (2, 3, 4, 8)"),
    (["--group_size", "48"], "in_features=64 is not divisible by block_in (group size) 48"),
    (["--method", "awq", "--group_size", "32"], "method='awq' is not a known quantizer"),
])
def test_bad_options_are_one_line_errors(tiny_dir, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", str(tiny_dir), *args])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines are progress bars
    assert last.startswith("lowbit-ft: error: ") and message in last


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tmp_path / "nope")])
    assert "not 'smollm2', a .gguf file, or a directory with config.json" in capsys.readouterr().err


def test_existing_output_refused_before_any_work(tiny_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_dir), "--output", str(tmp_path / "taken")])
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    cmd = [sys.executable, "-m", "lowbit_ft", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "quantize" in out and "Quantize a model's linear layers" in out


def test_boolean_options_work_as_bare_flags(tiny_dir, tmp_path, capsys):
    """README writes `--overwrite`; jsonargparse wanted `--overwrite true`."""
    out = tmp_path / "int4"
    main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--output", str(out)])
    main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--output", str(out),
          "--overwrite"])
    main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--overwrite",
          "--output", str(out), "--symmetric"])
    assert capsys.readouterr().out.count("saved (gptq_v2)") == 3


@pytest.mark.parametrize(("message", "expected"), [
    ("plain", "plain"),
    ("Problems parsing config: while parsing\n  in line 2\ndid not find ','",
     "Problems parsing config: while parsing in line 2 did not find ','"),
    ('Parser key "data.batch_size":\n  Expected a <class \'int\'>. Got value: abc',
     'Parser key "data.batch_size": Expected a <class \'int\'>. Got value: abc'),
    ("Does not validate against any of the Union subtypes\nSubtypes: [A, B]\nErrors:\n  - Not a valid subclass of A\n"
     "    Subclass types expect one of:\n    - a class path (str)\n  - LowBitPrecision bits=5 is not supported\n"
     "  - Import path x does not correspond to a subclass of B\nGiven value type: list",
     "LowBitPrecision bits=5 is not supported"),
    ('Parser key "model.targets":\n  Does not validate against any of the Union subtypes\n  Subtypes: [list[str], '
     "<class 'NoneType'>]\n  Errors:\n    - Expected a <class 'list'>\n    - Expected a <class 'NoneType'>\n  Given "
     "value type: <class 'str'>\n  Given value: q_proj",
     'Parser key "model.targets": q_proj is a str; it takes list[str] or null (a list is written [a, b])'),
    ('Parser key "x":\n  Does not validate against any of the Union subtypes\n  Subtypes: [dict[str, int], <class '
     "'float'>]\n  Given value type: <class 'str'>\n  Given value: abc",
     'Parser key "x": abc is a str; it takes dict[str, int] or float'),
])
def test_parser_reports_become_the_one_line_that_says_what_is_wrong(message, expected):
    from lowbit_ft.cli import innermost_error

    assert innermost_error(message) == expected


def test_the_overview_lists_the_lightning_commands_fit_offers():
    from lowbit_ft.cli import LIGHTNING_COMMANDS
    from lowbit_ft.train.cli import LowBitCLI

    assert tuple(LIGHTNING_COMMANDS) == LowBitCLI.COMMANDS == tuple(LowBitCLI.subcommands())


def test_an_output_name_too_long_is_refused_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch):
    """A name the file system cannot hold with its temporary suffix: one line at once (was: ENAMETOOLONG at the
    very end, after quantizing and the reload check)."""
    import lowbit_ft.commands

    def no_work(*args, **kwargs):
        raise AssertionError("the model was read before the output name was checked")

    monkeypatch.setattr(lowbit_ft.commands, "open_float", no_work)
    out = tmp_path / ("q" * 240)
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--output", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "its name is 240 bytes, and this file system holds names of 255" in last
    assert last.endswith("choose a name of at most 223 bytes")


@pytest.mark.parametrize(("code", "said"), [
    (errno.ENOSPC, "No space left on device (ENOSPC): free space there, or write somewhere with room"),
    (errno.EROFS, "Read-only file system (EROFS): write somewhere writable"),
    (errno.EACCES, "Permission denied (EACCES): give yourself permission there, or write somewhere else"),
])
def test_the_machine_refusing_a_write_is_one_line_naming_the_path(code, said, tiny_dir, tmp_path, capsys,
                                                                 monkeypatch):
    """What the disk says (full, read-only, no permission) while quantize writes: one line with the path and the
    fix, exit status 1, nothing left behind (was: a traceback)."""
    import lowbit_ft.fsutil

    def refused(tensors, path, metadata=None):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(lowbit_ft.fsutil, "save_file", refused)
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32",
              "--output", str(tmp_path / "q")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and last.startswith(f"lowbit-ft: error: {tmp_path / 'q/model.safetensors'}: ")
    assert said in last
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".q", "q"))]


def file_size_limit(limit: int):
    """For a subprocess: the kernel refuses writes past `limit` bytes per file (EFBIG, SIGXFSZ ignored): a full
    disk as the writers see it, whatever writes (safetensors' writer is Rust, not Python's file objects)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_the_kernel_refuses_is_one_line_naming_the_output(tiny_dir, tmp_path):
    """No patched writer: quantize under a 64 KiB file size limit. safetensors reports the kernel's refusal as a
    SafetensorError, not an OSError; it is one line naming the output's file and the fix, exit status 1, and
    nothing is left behind (was: a SafetensorError traceback)."""
    out = tmp_path / "q"
    run = subprocess.run([sys.executable, "-m", "lowbit_ft", "quantize", "--model", str(tiny_dir), "--bits", "4",
                          "--group_size", "32", "--output", str(out)], capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(64 << 10))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last == (
        f"lowbit-ft: error: {out / 'model.safetensors'}: File too large (EFBIG): the file system or the process's "
        "file size limit (ulimit -f) caps files there: write somewhere else, or raise the limit"), run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
