"""Files from outside are data, never code or paths: model / tokenizer directories that ask for remote code."""

import ast
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit_ft.cli import main
from lowbit_ft.config_files import MAX_CONFIG_CHARS, config_problem

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.fixture(params=["model", "tokenizer"])
def remote_code_dir(request, tiny_model_dir, tmp_path):
    """The tiny LLaMA directory with `auto_map` entries pointing at a Python file that writes a marker when it
    is imported: in config.json with a model_type only that file defines (and in tokenizer_config.json), or
    in tokenizer_config.json alone, with a tokenizer class only that file defines. Returns the directory, the
    marker and the one line expected."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    maps = [("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]})]
    if request.param == "model":
        maps.append(("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}))
    for name, entries in maps:
        data = json.loads((model / name).read_text())
        data["auto_map"] = entries
        if name == "config.json":
            data["model_type"] = "evil_llama"
        else:  # a tokenizer class only that file defines
            data["tokenizer_class"] = "EvilTokenizer"
        (model / name).write_text(json.dumps(data))
    expected = (f"{model / 'config.json'}: model_type 'evil_llama' is not supported (model_type llama, mistral, "
                "qwen2 are): it exists only as Python code inside its directory (auto_map), which lowbit-ft never "
                "runs") if request.param == "model" else (
        f"{model}: this model or tokenizer exists only as Python code inside its directory (auto_map); lowbit-ft "
        "never runs a model directory's code: use a model whose architecture transformers ships")
    return model, marker, expected


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "Hi", "--max_new_tokens", "1", "--template", "none"],
    ["quantize", "--bits", "4", "--group_size", "32", "--checkpoint_format", "lowbit"],
], ids=["generate", "quantize"])
def test_remote_code_never_runs_even_when_stdin_says_yes(remote_code_dir, tmp_path, command):
    model, marker, expected = remote_code_dir
    args = [sys.executable, "-m", "lowbit_ft", command[0], "--model", str(model), *command[1:]]
    if command[0] == "quantize":
        args += ["--output", str(tmp_path / "q")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(args, input="y\n" * 8, capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert not marker.exists(), run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last == f"lowbit-ft: error: {expected}", run.stderr[-2000:]


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


# --- config files ----------------------------------------------------------------------------------------------
def config_error(capsys, text: str, tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_two_sections_of_the_same_name_are_refused_naming_both_lines(capsys, tmp_path):
    text = "model:\n  r: 4\n  lr: 0.001\ndata:\n  max_length: 64\nmodel:\n  r: 64\n  lr: 0.5\n"
    assert config_error(capsys, text, tmp_path) == (
        f"lowbit-ft: error: --config {tmp_path / 'config.yaml'}: key 'model' is given twice, on lines 1 and 6; YAML "
        "would keep only the second: remove one")


def test_a_key_given_twice_is_refused_naming_both_lines(capsys, tmp_path):
    assert "key 'r' is given twice, on lines 2 and 4" in config_error(
        capsys, "model:\n  r: 4\n  alpha: 16\n  r: 8\n", tmp_path)


def test_a_command_line_yaml_value_is_loaded_strictly_too(capsys):
    """Refused, not read as {pooling: mean}; jsonargparse reports it as the option's type error (its wording)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.adapter_args", "{pooling: sum, pooling: mean}", "--print_config"])
    assert exit_info.value.code == 2 and 'key "model.adapter_args"' in capsys.readouterr().err


def test_an_alias_bomb_is_refused_at_once_in_little_memory(tmp_path):
    """Nine aliases of nine aliases of nine lists: billions of elements if expanded. Refused within 5 s with the
    process's address space capped at 500 MB."""
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nmodel:\n  adapter_args: {x: *a8}\n")

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (500 * 2**20, 500 * 2**20))

    run = subprocess.run([sys.executable, "-m", "lowbit_ft", "fit", "--config", str(bomb)], capture_output=True,
                         text=True, timeout=5, preexec_fn=cap_memory)
    assert run.returncode == 2 and "line 2: YAML aliases (*a0) are not accepted in configs" in run.stderr, run.stderr


def test_an_oversized_config_is_refused(capsys, tmp_path):
    text = "model:\n  adapter_args:\n    note: '" + "x" * (MAX_CONFIG_CHARS + 1) + "'\n"
    assert f"more than {MAX_CONFIG_CHARS:,}; a config this large is refused" in config_error(capsys, text, tmp_path)


def test_the_recipes_still_load():
    for recipe in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")):
        assert config_problem(["fit", "--config", str(recipe)]) is None, recipe


# --- numbers in files that decide an allocation -------------------------------------------------------------
CALL_TIMED = """
import sys, time
from lowbit_ft.formats.{module} import {function}
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        {function}(path)
        print("loaded", path)
    except ValueError as err:
        print(f"{{time.perf_counter() - start:.2f}}", err)
"""
LOADERS = [("stream", "open_float", None), ("load", "load_model", None), ("load", "load_quantized", "lowbit"),
           ("load", "load_model", "mlx")]


def saved_with(tiny_model_dir: Path, model: Path, saved_as: str | None, **change) -> Path:
    """The tiny model as a float directory or saved `saved_as` (INT4 g32), its config.json then changed."""
    if saved_as:
        from lowbit_ft import BlockLayout, quantize_model
        from lowbit_ft.formats.lowbit import save_lowbit
        from lowbit_ft.formats.mlx import save_mlx

        from .conftest import make_tiny_llama

        save = {"lowbit": save_lowbit, "mlx": save_mlx}[saved_as]
        save(quantize_model(make_tiny_llama(), BlockLayout.group(4, 32), progress=False), model)
    else:
        shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    (model / "config.json").write_text(json.dumps(config))
    return model


def refused_at_once(module: str, function: str, *models: Path) -> list[str]:
    """The one-line ValueError `function(model)` raises for each model, in a fresh process under a 3 GB address
    space, each within 5 s."""
    code = CALL_TIMED.format(module=module, function=function)
    run = subprocess.run([sys.executable, "-c", code, *map(str, models)], capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)))
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(models), run.stdout + run.stderr[-2000:]
    seconds, said = zip(*(line.split(" ", 1) for line in lines), strict=True)
    assert max(map(float, seconds)) < 5, lines
    return list(said)


@pytest.mark.parametrize(("module", "function", "saved_as"), LOADERS)
def test_a_million_layer_config_over_two_layers_of_weights_is_refused_at_once(tiny_model_dir, tmp_path, module,
                                                                             function, saved_as):
    """config.json's num_hidden_layers decides how many layers a skeleton gets: checked against the layers the
    safetensors headers hold before anything is built (the old code built a million layers' modules; an MLX
    directory still did)."""
    model = saved_with(tiny_model_dir, tmp_path / "model", saved_as, num_hidden_layers=1_000_000)
    assert refused_at_once(module, function, model) == [
        f"{model / 'config.json'}: num_hidden_layers is 1000000 but the weights hold 2 decoder layers: the config "
        "does not belong to these weights"]


WRONG_SHAPES = {  # a change to config.json: what is said (a float directory; a packed one if it differs)
    "hidden": ({"hidden_size": 1_000_000},
               "tensor model.embed_tokens.weight is [{vocab}, 64], but {config} makes it [{vocab}, 1000000]"),
    "vocab": ({"vocab_size": 10**9},
              "tensor model.embed_tokens.weight is [{vocab}, 64], but {config} makes it [1000000000, 64]"),
    "mlp": ({"intermediate_size": 10**8},  # a packed layer has no float shape: the bytes it would need
            "tensor model.layers.0.mlp.gate_proj.weight is [128, 64], but {config} makes it [100000000, 64]",
            "{config}: its decoder layers have 38,400,024,576 linear weights, at 2 bits each 9,600,006,144 bytes, "
            "but the weights hold"),
    "heads": ({"num_attention_heads": 3},
              "{config}: transformers refuses it: ValueError: The hidden size (64) is not a multiple of the number "
              "of attention heads (3)."),
}


@pytest.mark.parametrize(("module", "function", "saved_as"), LOADERS)
def test_a_config_whose_shapes_the_weights_do_not_hold_is_refused_before_allocating(
        tiny_model_dir, tmp_path, module, function, saved_as):
    """Every number in config.json that sizes a tensor is checked on a skeleton built on the meta device, before
    anything is allocated: float tensors against their headers' shapes, packed layers against the bytes the
    weights hold (were: allocations of 196 GB, 256 GB and 25.6 GB, or transformers' validation traceback)."""
    models = [saved_with(tiny_model_dir, tmp_path / name, saved_as, **change)
              for name, (change, *_) in WRONG_SHAPES.items()]
    lines = refused_at_once(module, function, *models)
    for model, line, (_, *said) in zip(models, lines, WRONG_SHAPES.values(), strict=True):
        expected = said[-1 if saved_as else 0].format(config=model / "config.json", vocab=256 if saved_as else 49152)
        assert line.startswith(str(model)) and expected in line, line


# --- the base's float tensors are part of what identifies it -------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    """A 4-step fit: its checkpoint records the base, and the base sits in the cache."""
    from .test_fit import fit_in

    run = fit_in(tmp_path_factory.mktemp("fit"), tiny_model_dir, "--trainer.plugins.init_args.group_size", "32",
                 steps=4)
    return run / "checkpoints/last.ckpt"


def cloned_base(ckpt: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The checkpoint and its cache entry copied under a new cache key (other tests keep the original):
    (the copied checkpoint, the copied entry)."""
    import hashlib

    import torch

    from lowbit_ft.formats.cache import cache_root

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = hashlib.sha256(f"{tmp_path}{name}".encode()).hexdigest()[:24]
    entry = cache_root() / key
    shutil.copytree(cache_root() / state["lowbit_base"]["cache_key"], entry)
    state["lowbit_base"]["cache_key"] = key
    torch.save(state, tmp_path / f"{name}.ckpt")
    return tmp_path / f"{name}.ckpt", entry


def corrupt_floats(entry: Path) -> None:
    """What the probe did to a cache entry: embed_tokens × 3 and 100 rows of lm_head zeroed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(entry / "model.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.embed_tokens.weight"] *= 3
    tensors["lm_head.weight"][:100] = 0
    save_file(tensors, entry / "model.safetensors", metadata=metadata)


def test_a_cache_entry_with_changed_embeddings_is_refused_naming_them(fitted, tmp_path, capsys):
    ckpt, entry = cloned_base(fitted, tmp_path, "embeddings")
    corrupt_floats(entry)
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"lowbit-ft: error: base cache entry {entry}: the base's lm_head.weight, "
                    "model.embed_tokens.weight differ from what it recorded: delete that directory")
    assert not (tmp_path / "o").exists()


def test_a_cache_entry_rewritten_with_its_record_is_refused_by_the_checkpoint(fitted, tmp_path, capsys):
    """The entry's own record rewritten to match the changed tensors: the checkpoint's record still names them."""
    from lowbit_ft.dtypes import DTYPES
    from lowbit_ft.formats.cache import RECORD_FILE, load_quantized, tensor_digests

    ckpt, entry = cloned_base(fitted, tmp_path, "record")
    corrupt_floats(entry)
    record = json.loads((entry / RECORD_FILE).read_text())
    record["tensors"] = tensor_digests(load_quantized(entry, dtype=DTYPES[record["dtype"]]))
    (entry / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("lowbit-ft: error: the checkpoint: the base's lm_head.weight, model.embed_tokens.weight differ "
                    "from what it recorded: point model.base (export: --base) at the base it was trained on")
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_from_before_float_digests_exports_and_says_so_once(fitted, tmp_path, capsys, caplog):
    """Checkpoints and cache entries written before the float tensors were recorded still export, checked on the
    quantized layers' fingerprint, and say so once each."""
    import torch

    from lowbit_ft.formats.cache import RECORD_FILE

    ckpt, entry = cloned_base(fitted, tmp_path, "old")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["lowbit_base"]["tensors"]
    torch.save(state, ckpt)
    record = json.loads((entry / RECORD_FILE).read_text())
    del record["tensors"]
    (entry / RECORD_FILE).write_text(json.dumps(record))
    for out in ("o1", "o2"):
        main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / out)])
    assert "merge check" in capsys.readouterr().out
    said = [r.getMessage() for r in caplog.records if "checked on the quantized layers' fingerprint only" in r.message]
    assert len(said) == 2 and {s.split(" was written")[0] for s in said} == {"the checkpoint",
                                                                              f"base cache entry {entry}"}


# --- SIGTERM while writing ------------------------------------------------------------------------------
PAUSED_WRITE = """
import sys, time
import lowbit_ft.fsutil as fsutil
def paused(root):  # every file of the output is in its temporary directory: wait there to be stopped
    print("WRITTEN", flush=True)
    time.sleep(120)
fsutil.default_permissions = paused
from lowbit_ft.cli import main
sys.argv = ["lowbit-ft", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_sigterm_while_writing_removes_the_partial_output(command, tiny_model_dir, fitted, tmp_path):
    """A scheduler's SIGTERM while quantize or export writes: exit status 143, one line, and neither the output
    nor its hidden temporary directory is left (Python's default would die at once and leave a full-size
    `.NAME.PID.*.partial` behind)."""
    import signal

    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group_size", "32"] \
        if command == "quantize" else ["export", "--checkpoint", str(fitted)]
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_WRITE, *args, "--output", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.strip() == "WRITTEN":
                break
        partial = list(tmp_path.glob(".out.*.partial"))
        assert len(partial) == 1 and any(partial[0].iterdir())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"lowbit-ft: stopped by SIGTERM during {command}; its partial output "
                                            "was removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- crafted headers: every number in a tensor file is checked against the file before it is trusted ---------
def safetensors_with(model_dir: Path, out: Path, change) -> Path:
    """`model_dir` copied to `out` with its safetensors header changed by `change(header, data)` → bytes."""
    import struct

    shutil.copytree(model_dir, out)
    raw = (out / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    (out / "model.safetensors").write_bytes(change(header, first, raw[8 + n:]))
    return out


def packed_header(header: dict, data: bytes) -> bytes:
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def changed(**entry):
    def change(header, first, data):
        header[first].update(entry)
        return packed_header(header, data)
    return change


@pytest.mark.parametrize(("case", "change", "said"), [
    ("a 2^62-byte header", lambda h, first, data: (1 << 62).to_bytes(8, "little") + b"{}" * 8,
     "model.safetensors: not a safetensors file (no header of a plausible size)"),
    ("a 4 TiB tensor", changed(data_offsets=[0, 4 << 40]), "model.safetensors: tensor lm_head.weight lies outside "
                                                           "the file"),
    # these two reached transformers, whose safetensors reader raised SafetensorError (a traceback)
    ("an absurd shape", changed(shape=[1 << 20, 1 << 22]), "model.safetensors: tensor lm_head.weight spans 12582912 "
                                                           "bytes, its shape [1048576, 4194304] needs 17592186044416"),
    ("an unknown dtype", changed(dtype="Q9"), "model.safetensors: tensor lm_head.weight has dtype 'Q9', which is no "
                                              "safetensors dtype"),
])
def test_a_crafted_safetensors_header_is_one_line(case, change, said, tiny_model_dir, tmp_path, capsys):
    model = safetensors_with(tiny_model_dir, tmp_path / "model", change)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model), "--prompt", "hi", "--max_new_tokens", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1] == f"lowbit-ft: error: {model / said}", case


def small_gguf(path: Path) -> Path:
    """A valid GGUF: a string, a string array, an int array and two tensors (one Q4_1)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "crafted")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1])
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((2, 20), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_crafted(data: bytes, case: str) -> bytes:
    """`data` (small_gguf's bytes) with one number changed as an attacker would."""
    import struct

    big = struct.pack("<Q", 1 << 62)
    name = data.index(b"general.name")  # preceded by its 8-byte length
    tokens = data.index(b"tokenizer.ggml.tokens")
    tokens_count = tokens + len("tokenizer.ggml.tokens") + 4 + 4  # after the value type and the item type
    return {
        "tensor count 2^62": lambda: data[:8] + big + data[16:],
        "metadata count 2^62": lambda: data[:16] + big + data[24:],
        "key length 2^62": lambda: data[:name - 8] + big + data[name:],
        "array count 2^62": lambda: data[:tokens_count] + big + data[tokens_count + 8:],
        "cut inside the tensors": lambda: data[:-40],  # the last tensor's 40 bytes are padded to 64
    }[case]()


@pytest.mark.parametrize(("case", "said"), [
    ("tensor count 2^62", "4611686018427387904 tensors cannot fit in the"),
    ("metadata count 2^62", "4611686018427387904 metadata entries cannot fit in the"),
    ("key length 2^62", "runs past the end of the file"),
    ("array count 2^62", "4611686018427387904 items of tokenizer.ggml.tokens cannot fit in the"),
    ("cut inside the tensors", "tensor token_embd.weight (40 bytes at offset 256) lies outside the file"),
])
def test_a_crafted_gguf_header_is_one_line(case, said, tmp_path, capsys):
    """Each was a struct.error traceback from gguf's reader inside transformers (or an allocation sized by it)."""
    path = tmp_path / "crafted.gguf"
    path.write_bytes(gguf_crafted(small_gguf(tmp_path / "small.gguf").read_bytes(), case))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(path), "--prompt", "hi", "--max_new_tokens", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"lowbit-ft: error: {path}: damaged GGUF header: ") and said in lines[0], lines[0]
    assert lines[0].endswith("; the file is cut short or not a GGUF model")


def test_gguf_headers_that_are_whole_pass_the_check(tmp_path):
    from lowbit_ft.formats.load import smollm2_gguf
    from lowbit_ft.formats.tensor_file import check_gguf_header

    check_gguf_header(small_gguf(tmp_path / "small.gguf"))
    check_gguf_header(smollm2_gguf())


GENERATE = ["generate", "--prompt", "hi", "--max_new_tokens", "1", "--model"]
QUANTIZE = ["quantize", "--bits", "4", "--group_size", "32", "--model"]


@pytest.mark.parametrize("command", [QUANTIZE, GENERATE], ids=["quantize", "generate"])
@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/abs/model.safetensors", ".."])
def test_a_shard_index_naming_a_file_outside_the_directory_is_refused(command, shard, tiny_model_dir, tmp_path,
                                                                      capsys):
    """model.safetensors.index.json's file names became paths: quantize read '../elsewhere/…', another
    directory's weights, and wrote its model from them (exit 0)."""
    from safetensors import safe_open

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "elsewhere").mkdir()
    (model / "model.safetensors").rename(tmp_path / "elsewhere" / "model.safetensors")
    with safe_open(str(tmp_path / "elsewhere" / "model.safetensors"), "pt") as f:
        weight_map = dict.fromkeys(f.keys(), shard)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(SystemExit) as exit_info:
        main([*command, str(model), "--output", str(tmp_path / "out")][:None if command == QUANTIZE else -2])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1] == (
        f"lowbit-ft: error: {model / 'model.safetensors.index.json'}: its weight_map names {shard!r}, which is not a "
        "file name; the shards must sit beside the index"), lines[-3:]


def test_a_shard_index_that_is_not_one_is_one_line(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weights": {}}))
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model), "--prompt", "hi", "--max_new_tokens", "1"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lowbit-ft: error: {model / 'model.safetensors.index.json'}: not a safetensors index (a JSON object whose "
        "weight_map maps each tensor to its file)")


def test_an_output_marker_that_is_not_ours_leaves_the_directory_alone(tiny_model_dir, tmp_path, capsys):
    """--overwrite replaces a directory only by the file list its marker holds: a marker that is not that list
    (not JSON, not an object, names that are not strings, undecodable bytes) is one line, and nothing in the
    directory is touched (was: JSON's own message naming no file, or an AttributeError traceback)."""
    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group_size", "32", "--output", str(out)]
    main(args)
    marker = out / ".lowbit-ft-output.json"
    held = sorted(p.name for p in out.iterdir())
    for text in (b"{", b"[1, 2]", b'{"files": "model.safetensors"}', b'{"files": [1]}', b'{"files": ["\xff"]}'):
        marker.write_bytes(text)
        with pytest.raises(SystemExit):
            main([*args, "--overwrite", "true"])
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"lowbit-ft: error: output {out}: its .lowbit-ft-output.json is not the file list lowbit-ft writes, so "
            "what the directory holds cannot be told apart; --overwrite leaves it alone: choose another path"), text
        assert sorted(p.name for p in out.iterdir()) == held and marker.read_bytes() == text


@pytest.mark.parametrize(("key", "value", "held"), [
    ("llama.block_count", 1_000_000, 2), ("llama.embedding_length", 1_000_000, 64),
    ("llama.feed_forward_length", 10**8, 128)])
def test_gguf_metadata_sizes_its_tensors_do_not_hold_are_refused_at_once(key, value, held, tmp_path):
    """A GGUF's metadata decides the model transformers builds from it: a block count, width or MLP size its
    tensors do not have is one line before anything is built (were: a million blocks still building after 120 s,
    and transformers' size-mismatch traceback)."""
    import struct

    from lowbit_ft import BlockLayout, quantize_model
    from lowbit_ft.formats.export import export
    from lowbit_ft.formats.gguf import GGUF_FILE
    from lowbit_ft.formats.load import load_tokenizer

    from .conftest import make_tiny_llama

    model = quantize_model(make_tiny_llama(vocab=49152), BlockLayout.group(4, 32), progress=False)
    path = export(model, tmp_path / "gguf", format="gguf", tokenizer=load_tokenizer("smollm2")) / GGUF_FILE
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert struct.unpack_from("<II", data, at) == (4, held)  # a uint32 holding what the tensors hold
    struct.pack_into("<I", data, at + 4, value)
    path.write_bytes(bytes(data))
    assert refused_at_once("load", "load_model", path) == [
        f"{path}: {key} is {value} but its tensors hold {held}: the metadata does not belong to these weights"]
