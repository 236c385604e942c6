"""Files from outside are data, never code or paths: model / tokenizer directories that ask for remote code."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.fixture
def remote_code_dir(tiny_model_dir, tmp_path):
    """The tiny LLaMA directory with `auto_map` entries in config.json and tokenizer_config.json pointing at a
    Python file that writes a marker when it is imported."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    for name, entries in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}),
                          ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]})):
        data = json.loads((model / name).read_text())
        data["auto_map"] = entries
        if name == "config.json":  # a model_type transformers does not know: only the directory's code has it
            data["model_type"] = "evil_llama"
        (model / name).write_text(json.dumps(data))
    return model, marker


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "Hi", "--max_new_tokens", "1", "--template", "none"],
    ["quantize", "--bits", "4", "--group_size", "32", "--checkpoint_format", "lowbit"],
], ids=["generate", "quantize"])
def test_remote_code_never_runs_even_when_stdin_says_yes(remote_code_dir, tmp_path, command):
    model, marker = remote_code_dir
    args = [sys.executable, "-m", "lowbit_ft", command[0], "--model", str(model), *command[1:]]
    if command[0] == "quantize":
        args += ["--output", str(tmp_path / "q")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(args, input="y\n" * 8, capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert not marker.exists(), run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last == (
        f"lowbit-ft: error: {model}: this model or tokenizer exists only as Python code inside its directory "
        "(auto_map); lowbit-ft never runs a model directory's code: use a model whose architecture transformers "
        "ships"), run.stderr[-2000:]


def test_every_transformers_load_in_the_package_refuses_remote_code():
    """A from_pretrained / from_config call without an explicit trust_remote_code=False may prompt on stdin and
    run a directory's code: every such call in the package passes it."""
    root = Path(__file__).resolve().parent.parent
    loads, missing = 0, []
    for path in [*root.glob("lowbit_ft/**/*.py"), *root.glob("callbacks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("from_pretrained", "from_config"):
                loads += 1
                if not any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords):
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert loads >= 10, "found too few transformers loads: the scan is broken"
    assert not missing, missing
