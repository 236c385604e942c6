"""From `lowbit-ft fit` to a deployable model: MergeCheck + QuantizedExport in the run, `lowbit-ft export`
from the checkpoint, and the GPTQ export loaded by transformers + gptqmodel."""

import csv
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit_ft import BlockLayout, load_quantized, quantize_model
from lowbit_ft.cli import main
from lowbit_ft.formats.export import export
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.train.checkpoint import module_from_checkpoint

from .conftest import make_tiny_llama
from .test_fit import fit_args, fit_in


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short fit with MergeCheck and QuantizedExport in the callbacks."""
    root = tmp_path_factory.mktemp("fit")
    fit_in(root, tiny_model_dir, "--trainer.callbacks+=lowbit_ft.callbacks.MergeCheck",
           "--trainer.callbacks+=lowbit_ft.callbacks.QuantizedExport",
           "--trainer.callbacks.output", "merged", steps=4)  # inside the run directory
    return root


def test_fit_runs_the_merge_check_and_exports(trained):
    (metrics,) = trained.glob("out/quickstart/version_0/logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("merge_check/layer/max_rel")]
    assert rows and float(rows[-1]["merge_check/layer/max_rel"]) < 1e-4
    assert float(rows[-1]["merge_check/merged/top1_agreement"]) == 1.0
    card = (trained / "out/quickstart/version_0/merged/README.md").read_text()
    assert "adapter merged: qa_lora" in card and "merged/top1_agreement: 1" in card
    assert len(quant_layers(load_quantized(trained / "out/quickstart/version_0/merged"))) == 14


def test_export_command_matches_the_adapter_on_model(trained, tmp_path, capsys):
    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    out = tmp_path / "exported"
    main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--dtype", "float32"])
    text = capsys.readouterr().out
    assert "merge check           layer/max_abs=" in text and f"exported (lowbit)     {out.resolve()}" in text
    module = module_from_checkpoint(ckpt)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter_on = module.model(tokens).logits
        merged = load_quantized(out, dtype=torch.float32)(tokens).logits
    assert (merged - adapter_on).norm() / adapter_on.norm() < 1e-5
    assert torch.equal(merged.argmax(-1), adapter_on.argmax(-1))


@pytest.mark.parametrize("content,message", [
    (b"", "not a readable checkpoint"),
    (None, "file not found"),
])
def test_export_command_refuses_bad_checkpoints(tmp_path, capsys, content, message):
    ckpt = tmp_path / "x.ckpt"
    if content is not None:
        ckpt.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_export_command_refuses_a_foreign_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "o")])
    assert "not a lowbit-ft training checkpoint" in capsys.readouterr().err


GPTQMODEL_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, GPTQConfig
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=GPTQConfig(bits=int(sys.argv[2]),
        backend="torch"), device_map="cpu", dtype=torch.float16)
    layer = model.model.layers[0].mlp.down_proj
    print(type(layer).__module__)
    torch.save({"weight": layer.dequantize_weight().float()}, sys.argv[3])
""")


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_export_loads_in_transformers_with_gptqmodel(tmp_path, bits):
    """The unmerged base as gptq_v2, read by GPTQModel's torch kernel: the same dequantized weights."""
    model = make_tiny_llama()
    quantize_model(model, BlockLayout.group(bits, 32), progress=False)
    export(model, tmp_path / "gptq", format="gptq")
    done = subprocess.run([sys.executable, "-c", GPTQMODEL_LOAD, str(tmp_path / "gptq"), str(bits),
                           str(tmp_path / "w.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gptqmodel" in done.stdout
    theirs = torch.load(tmp_path / "w.pt", weights_only=True)["weight"]
    ours = quant_layers(model)["model.layers.0.mlp.down_proj"].dequantize(torch.float32)
    theirs = theirs if theirs.shape == ours.shape else theirs.t()
    # GPTQModel dequantizes in float16: s·(q − z) rounded once, half an fp16 ulp of the weight
    assert ((theirs - ours).abs() <= ours.abs() * 2**-11 + 1e-7).all()


@pytest.mark.parametrize(("args", "message"), [
    ([], "give either --checkpoint (a lowbit-ft fit checkpoint) or --peft_adapter with --base"),
    (["--peft_adapter", "x"], "--peft_adapter needs --base"),
    (["--checkpoint", "x.ckpt", "--base", "y"], "--checkpoint x.ckpt: file not found"),
    (["--peft_adapter", "nowhere", "--base", "y"], "--peft_adapter nowhere: no adapter_config.json"),
])
def test_export_sources_are_checked_before_anything_loads(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", "--output", "out", *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_command_writes_gguf_and_mlx_from_a_checkpoint(trained, tmp_path, capsys):
    """The fit's QA-LoRA (INT4, g = 32) through `lowbit-ft export` into the two runtime formats; both carry
    the tokenizer and the model card with the merge check's figures."""
    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    for fmt, file in (("gguf", "model-Q4_1.gguf"), ("mlx", "model.safetensors")):
        main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(tmp_path / fmt)])
        assert f"exported ({fmt})" in capsys.readouterr().out
        assert (tmp_path / fmt / file).is_file() and (tmp_path / fmt / "tokenizer.json").is_file()
        assert "merged/top1_agreement" in (tmp_path / fmt / "README.md").read_text()


def test_a_checkpoint_from_before_fingerprints_still_exports(trained, tmp_path, capsys):
    """Older checkpoints stored the plugin's arguments ("lowbit_precision") instead of the base's record."""
    path = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = ckpt.pop("lowbit_base")["spec"]
    ckpt["lowbit_precision"] = {"bits": spec["bits"], "group_size": spec["group_size"], "block_out": 1,
                                "method": "rtn", "symmetric": False, "dtype": "float32", "targets": None,
                                "ignore_modules": None}
    torch.save(ckpt, tmp_path / "old.ckpt")
    main(["export", "--checkpoint", str(tmp_path / "old.ckpt"), "--output", str(tmp_path / "out")])
    assert "merged/top1_agreement=1" in capsys.readouterr().out


def legacy_pooling_checkpoint(trained, tmp_path):
    """The fit's sum-pooled checkpoint rewritten as one from before adapters recorded their hparams (no
    "lowbit_adapter"), which were trained with mean pooling: B·A / g per group, so B × g keeps ΔW."""
    path = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt.pop("lowbit_adapter")["hparams"]["pooling"] == "sum"
    ckpt["hyper_parameters"]["adapter_args"] = {  # the option did not exist: no recipe set it
        k: v for k, v in (ckpt["hyper_parameters"]["adapter_args"] or {}).items() if k != "pooling"}
    group = ckpt["lowbit_base"]["spec"]["group_size"]
    for key in ckpt["state_dict"]:
        if key.endswith("lora_B"):
            ckpt["state_dict"][key] = ckpt["state_dict"][key] * group
    torch.save(ckpt, tmp_path / "old.ckpt")
    return path, tmp_path / "old.ckpt"


def test_a_checkpoint_from_before_pooling_exports_with_mean_pooling(trained, tmp_path):
    path, old_ckpt = legacy_pooling_checkpoint(trained, tmp_path)
    main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "new"), "--dtype", "float32"])
    main(["export", "--checkpoint", str(old_ckpt), "--output", str(tmp_path / "old"), "--dtype", "float32"])
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new = load_quantized(tmp_path / "new", dtype=torch.float32)(tokens).logits
        old = load_quantized(tmp_path / "old", dtype=torch.float32)(tokens).logits
    assert (old - new).abs().max() < 1e-4
    module = module_from_checkpoint(path)  # sum-pooled adapters cannot continue from the old checkpoint
    with pytest.raises(ValueError, match="trained with pooling='mean', this model builds pooling='sum'"):
        module.on_load_checkpoint(torch.load(old_ckpt, weights_only=True))


def test_a_checkpoint_from_before_pooling_resumes_once_told_mean(trained, tiny_model_dir, tmp_path, monkeypatch,
                                                                 capsys):
    """Resuming it with today's recipe is refused by name; with adapter_args.pooling mean it continues."""
    _, old = legacy_pooling_checkpoint(trained, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(fit_args(tiny_model_dir, "--ckpt_path", str(old), steps=6))
    assert "model.adapter_args is {'pooling': 'mean'} in the checkpoint but {} now" in capsys.readouterr().err
    main(fit_args(tiny_model_dir, "--ckpt_path", str(old), "--model.adapter_args", "{pooling: mean}", steps=6))
    ckpt = torch.load(next(tmp_path.glob("out/quickstart/version_*/checkpoints/last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["lowbit_adapter"]["hparams"]["pooling"] == "mean"


def test_overwrite_never_deletes_a_run_or_foreign_files(trained, tmp_path, capsys):
    """Harm 1 of the reliability review: `--output RUN --overwrite true` deleted the checkpoint it exported."""
    run = tmp_path / "run"
    shutil.copytree(trained / "out/quickstart/version_0", run)
    ckpt = run / "checkpoints/last.ckpt"
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", str(run), "--overwrite", "true"])
    assert f"output {run} is not a directory lowbit-ft wrote" in capsys.readouterr().err
    assert ckpt.is_file() and (run / "adapters.safetensors").is_file()
    merged = tmp_path / "merged"
    main(["export", "--checkpoint", str(ckpt), "--output", str(merged)])
    (merged / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", str(merged), "--overwrite", "true"])
    assert "holds notes.txt, which lowbit-ft did not write there" in capsys.readouterr().err
    assert (merged / "notes.txt").read_text() == "mine"
    (merged / "notes.txt").unlink()
    with pytest.raises(SystemExit):  # the checkpoint itself as the output
        main(["export", "--checkpoint", str(ckpt), "--output", str(ckpt), "--overwrite"])
    assert "is (or holds) the input" in capsys.readouterr().err and ckpt.is_file()
    main(["export", "--checkpoint", str(ckpt), "--output", str(merged), "--overwrite", "true"])  # our own: replaced
    assert (merged / "model.safetensors").is_file()


def toy_format():
    """A checkpoint format the package does not know: dense float32 weights in one safetensors file, marked by a
    `toy_format` key in config.json. Registered by the test alone (no package file edited)."""
    import copy
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit_ft.formats.format import CheckpointFormat
    from lowbit_ft.quant.convert import dequantize_model

    def save(model, out_dir, *, tokenizer, dtype, overwrite, model_card, round_zeros):
        out = Path(out_dir)
        out.mkdir()
        dense = dequantize_model(copy.deepcopy(model), torch.float32)
        save_file({k: v.detach().clone().contiguous() for k, v in dense.state_dict().items()}, out / "toy.safetensors")
        (out / "config.json").write_text(json.dumps({**model.config.to_dict(), "toy_format": 1}))
        tokenizer.save_pretrained(out)
        return out

    def load(path, dtype):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        model.load_state_dict(load_file(path / "toy.safetensors"))
        return model.to(dtype).eval(), None

    return CheckpointFormat("toy", save, detect=lambda path, config: config.get("toy_format") == 1, load=load)


def test_a_format_registered_by_a_test_round_trips(trained, tmp_path, capsys, monkeypatch):
    """A new format is one `CheckpointFormat` plus one registry entry: `lowbit-ft export --format toy` writes it
    (merged), `load_model` recognises and reads it, and it computes what the adapter-on model did."""
    from lowbit_ft.formats.load import load_model
    from lowbit_ft.formats.registry import FORMATS

    monkeypatch.setitem(FORMATS, "toy", toy_format())
    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    out = tmp_path / "toy"
    main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--format", "toy", "--dtype", "float32"])
    assert f"exported (toy)     {out.resolve()}" in capsys.readouterr().out
    model, tokenizer = load_model(str(out))
    assert not quant_layers(model) and tokenizer is not None
    module = module_from_checkpoint(ckpt)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter_on = module.model(tokens).logits
        loaded = model(tokens).logits
    assert (loaded - adapter_on).norm() / adapter_on.norm() < 1e-5
    assert torch.equal(loaded.argmax(-1), adapter_on.argmax(-1))


def test_a_checkpoint_naming_a_cache_entry_outside_the_cache_is_refused(trained, tmp_path, capsys):
    """A base record's cache key is a name read from a file: a path in it ('../../elsewhere') must never be
    followed, even when a loadable base sits there."""
    from lowbit_ft.formats.cache import cache_root

    ckpt = torch.load(trained / "out/quickstart/version_0/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=True)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cache_root() / ckpt["lowbit_base"]["cache_key"], elsewhere)
    ckpt["lowbit_base"]["cache_key"] = os.path.relpath(elsewhere, cache_root())
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "crafted.ckpt"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "crafted.ckpt: its base record names cache entry '../" in err
    assert "which is not a cache key" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_a_checkpoint_whose_base_moved_says_what_each_command_takes(command, trained, tmp_path, capsys):
    """eval and generate take a checkpoint as --model and have no --base: they say how to get there (was: 'pass
    --base', which they refuse); export names its own --base."""
    ckpt = torch.load(trained / "out/quickstart/version_0/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=True)
    ckpt["hyper_parameters"]["base"] = str(tmp_path / "moved-away")
    ckpt["lowbit_base"]["cache_key"] = None
    torch.save(ckpt, tmp_path / "moved.ckpt")
    (tmp_path / "task.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    args = {"eval": ["eval", "--model", str(tmp_path / "moved.ckpt"), "--data", str(tmp_path / "task.jsonl")],
            "generate": ["generate", "--model", str(tmp_path / "moved.ckpt"), "--prompt", "Hi"],
            "export": ["export", "--checkpoint", str(tmp_path / "moved.ckpt"), "--output", str(tmp_path / "o")]}
    with pytest.raises(SystemExit):
        main(args[command])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"its base '{tmp_path / 'moved-away'}' is not there (moved?)" in last
    if command == "export":
        assert "pass --base with the base it was trained on" in last
    else:
        assert last.endswith(f"export with `lowbit-ft export --checkpoint {tmp_path / 'moved.ckpt'} --base BASE "
                             "--output DIR` and give --model DIR")


def test_a_checkpoint_whose_adapter_shapes_disagree_with_its_settings_is_one_line(trained, tmp_path, capsys):
    """A checkpoint whose recorded model.r is not the rank its tensors have (edited, or mixed up): one line
    naming the tensor and both shapes (was: torch's 'size mismatch' traceback)."""
    ckpt = torch.load(trained / "out/quickstart/version_0/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=True)
    ckpt["hyper_parameters"]["r"] = 8  # trained at r 4
    torch.save(ckpt, tmp_path / "r8.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "r8.ckpt"), "--output", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"lowbit-ft: error: checkpoint tensor model\.model\.layers\.0\.\S+ is \(\d+, \d+\), this "
                        r"model's \(\d+, \d+\): the checkpoint was trained with other adapter settings \(model\.r, "
                        r"adapter_args\); resume or export with the settings it was trained with", last), last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["lowbit", "gguf", "mlx"])
def test_an_export_the_kernel_refuses_to_write_is_one_line_naming_the_output(fmt, trained, tmp_path):
    """Each format's writer under a 4 MiB file size limit (the tokenizer fits, the weights do not; the kernel
    refuses the write: EFBIG): one line naming
    the output, never its temporary name or no name at all (the GGUF writer's failing write named no file),
    exit status 1, nothing left behind."""
    from .test_cli import file_size_limit

    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lowbit_ft", "export", "--checkpoint", str(ckpt), "--format", fmt,
                          "--output", str(out)], capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(4 << 20))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and re.fullmatch(
        rf"lowbit-ft: error: {re.escape(str(out))}(/[\w.-]+)?: File too large \(EFBIG\): .*", last), run.stderr[-3000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_read_only_parent_is_one_line_naming_the_output(command, trained, tmp_path, capsys, monkeypatch):
    """The temporary directory or file beside the output cannot be made (a read-only parent): the line names the
    output asked for, not the temporary name tried (was: /parent/.out.PID.xxxx.partial)."""
    import errno
    import tempfile

    def read_only(*args, dir=None, prefix="", suffix="", **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    out = tmp_path / ("merged" if command == "export" else "said.json")
    args = ["export", "--checkpoint", str(ckpt), "--output", str(out)] if command == "export" else \
        ["generate", "--model", str(ckpt), "--prompt", "hi", "--max_new_tokens", "1", "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and last.startswith(f"lowbit-ft: error: {out}: Read-only file system (EROFS)")


def test_generate_runs_on_a_gguf_export_with_the_training_tokenizer(trained, tiny_model_dir, tmp_path, capsys):
    """`lowbit-ft generate --model EXPORT/model-Q4_1.gguf`: the tokenizer files written beside the GGUF are read
    whole, special tokens included (was: transformers' GGUF path took their vocabulary without BOS / EOS, and
    generate failed inside transformers with a TypeError)."""
    import json

    from lowbit_ft.formats.gguf import GGUF_FILE
    from lowbit_ft.formats.load import load_tokenizer

    ckpt = trained / "out/quickstart/version_0/checkpoints/last.ckpt"
    main(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--output", str(tmp_path / "gguf")])
    path = tmp_path / "gguf" / GGUF_FILE
    theirs, ours = load_tokenizer(str(path)), load_tokenizer(str(tiny_model_dir))
    assert (theirs.bos_token, theirs.eos_token) == (ours.bos_token, ours.eos_token) != (None, None)
    capsys.readouterr()
    main(["generate", "--model", str(path), "--prompt", "Say hi.", "--max_new_tokens", "3",
          "--output", str(tmp_path / "said.json")])
    (record,) = map(json.loads, (tmp_path / "said.json").read_text().splitlines())
    assert record["prompt"] == "Say hi." and isinstance(record["answer"], str)
