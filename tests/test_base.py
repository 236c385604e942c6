"""The quantized base as one artifact: QuantSpec, the base cache, fingerprints, and the fit → export path
that must reproduce the trained model from the very base it was trained on (GPTQ not re-run)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import lowbit_ft.quant.gptq
from lowbit_ft import BlockLayout, load_quantized, quantize_model
from lowbit_ft.adapters import attach, merge_dense
from lowbit_ft.cli import main
from lowbit_ft.formats.cache import RECORD_FILE, cache_root, fingerprint, quantized_base
from lowbit_ft.formats.lowbit import save_lowbit
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.spec import QuantSpec, calibration_batches
from lowbit_ft.train.checkpoint import module_from_checkpoint

from .conftest import make_tiny_llama
from .test_fit import fit_args

RECIPES = Path(__file__).parent.parent / "recipes"


# --- QuantSpec ------------------------------------------------------------------------------------
def test_spec_round_trips_through_a_dict_and_refuses_what_it_cannot_be():
    spec = QuantSpec(bits=3, group_size=32, method="gptq", calibration_data="builtin:demo", targets=("q_proj",))
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.layout == BlockLayout(3, 1, 32)
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        QuantSpec.from_dict({**spec.to_dict(), "colour": 1})
    for kwargs, message in [({"bits": 5}, "bits=5 is not supported"), ({"method": "awq"}, "method='awq'"),
                            ({"targets": ("lm_head",)}, "cannot be quantized"),
                            ({"calibration_mode": "zip"}, "calibration_mode='zip'"),
                            ({"calibration_length": 1}, "calibration_length=1 must be")]:
        with pytest.raises(ValueError, match=message):
            QuantSpec(**kwargs)


def test_one_default_group_size():
    import inspect

    from lowbit_ft.commands import quantize
    from lowbit_ft.train.precision import LowBitPrecision

    defaults = {inspect.signature(f).parameters["group_size"].default for f in (quantize, LowBitPrecision.__init__)}
    assert defaults == {QuantSpec().group_size}


# --- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_names_the_codes_scales_and_zeros_not_their_storage():
    model = quantize_model(make_tiny_llama(), BlockLayout.group(4, 32), progress=False)
    fp = fingerprint(model)
    # scales stored in float32 instead of float16 (same values): same base
    wide = copy.deepcopy(model)
    for layer in quant_layers(wide).values():
        layer.scales = layer.scales.float()
    assert fingerprint(wide) == fp
    # adapters attached: the base underneath is the same
    assert fingerprint(attach(copy.deepcopy(model), "qa_lora", r=4)) == fp
    # one zero moved (e.g. a merged adapter), or one code flipped: another base
    moved = copy.deepcopy(model)
    quant_layers(moved)["model.layers.1.mlp.down_proj"].zeros[0, 0] += 0.5
    assert fingerprint(moved) != fp
    flipped = copy.deepcopy(model)
    quant_layers(flipped)["model.layers.0.self_attn.q_proj"].qweight[0, 0] ^= 1
    assert fingerprint(flipped) != fp


def test_tensor_digests_name_every_tensor_the_fingerprint_leaves_out():
    """Embeddings, norms, lm_head and the quantized layers' biases, by their names without adapters; attaching
    adapters or storing in float16 and reading back in float32 leaves them alone; one changed value changes
    exactly that tensor's digest."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowbit_ft.formats.cache import tensor_digests

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    quantize_model(model.half().float(), BlockLayout.group(4, 32), progress=False)
    digests = tensor_digests(model)
    assert set(digests) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                            "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                            *(f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv")}
    assert tensor_digests(attach(copy.deepcopy(model), "qa_lora", r=4)) == digests
    assert tensor_digests(copy.deepcopy(model).half().float()) == digests
    changed = copy.deepcopy(model)
    changed.model.layers[0].self_attn.k_proj.bias.data[3] += 1
    after = tensor_digests(changed)
    assert {k for k in digests if after[k] != digests[k]} == {"model.layers.0.self_attn.k_proj.bias"}


# --- the cache -------------------------------------------------------------------------------------
def test_a_built_base_is_cached_and_reused_bitwise(tiny_model_dir, monkeypatch):
    spec = QuantSpec(bits=3, group_size=32, method="gptq", calibration_data="builtin:demo",
                     calibration_samples=2, calibration_length=32)
    first = quantized_base(str(tiny_model_dir), spec, progress=False)
    entry = cache_root() / first.cache_key
    assert json.loads((entry / RECORD_FILE).read_text())["fingerprint"] == first.fingerprint

    def no_gptq(*args, **kwargs):
        raise AssertionError("GPTQ ran again")

    monkeypatch.setattr(lowbit_ft.quant.gptq, "gptq_quantize_model", no_gptq)
    again = quantized_base(str(tiny_model_dir), spec, progress=False)
    assert again.fingerprint == first.fingerprint and again.cache_key == first.cache_key
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first.model(tokens).logits, again.model(tokens).logits)
    # another spec is another entry: quantizing it would run GPTQ
    with pytest.raises(AssertionError, match="GPTQ ran again"):
        quantized_base(str(tiny_model_dir), QuantSpec(**{**spec.to_dict(), "bits": 4}), progress=False)


def test_a_damaged_cache_entry_is_refused(tiny_model_dir):
    spec = QuantSpec(bits=4, group_size=32)
    base = quantized_base(str(tiny_model_dir), spec, progress=False)
    entry = cache_root() / base.cache_key
    record = json.loads((entry / RECORD_FILE).read_text())
    (entry / RECORD_FILE).write_text(json.dumps({**record, "fingerprint": "sha256:" + "0" * 64}))
    try:
        with pytest.raises(ValueError, match=f"base cache entry {entry} is damaged"):
            quantized_base(str(tiny_model_dir), spec, progress=False)
    finally:
        shutil.rmtree(entry)


@pytest.fixture
def own_source(tiny_model_dir, tmp_path):
    """The tiny model copied: a source no other test has a cache entry for."""
    return str(shutil.copytree(tiny_model_dir, tmp_path / "source"))


def unwritable_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]


def test_a_read_only_cache_is_no_cache_with_one_warning(own_source, monkeypatch, caplog):
    import contextlib
    import errno

    import lowbit_ft.formats.cache as cache

    @contextlib.contextmanager
    def read_only(root, key):
        raise OSError(errno.EROFS, "Read-only file system")
        yield

    monkeypatch.setattr(cache, "_cache_lock", read_only)
    monkeypatch.setattr(cache, "_UNWRITABLE_SAID", set())
    spec = QuantSpec(bits=4, group_size=32)
    bases = [quantized_base(own_source, spec, progress=False) for _ in range(2)]
    assert [b.cache_key for b in bases] == [None, None] and bases[0].fingerprint == bases[1].fingerprint
    assert not (cache_root() / cache.cache_key(own_source, spec, torch.float32)).exists()
    (said,) = unwritable_warnings(caplog)
    assert said.startswith(f"cache {cache_root()} cannot be written (Read-only file system): going on without")


def test_a_full_disk_while_caching_leaves_no_entry_and_the_run_goes_on(own_source, monkeypatch, caplog):
    """The base cache's write fails half way (ENOSPC): no entry, no partial one, one warning, the base in hand;
    the next run with room caches it."""
    import errno

    import lowbit_ft.formats.cache as cache
    import lowbit_ft.fsutil

    real_save = lowbit_ft.fsutil.save_file

    def half_then_full(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lowbit_ft.fsutil, "save_file", half_then_full)
    monkeypatch.setattr(cache, "_UNWRITABLE_SAID", set())
    spec = QuantSpec(bits=4, group_size=32)
    key = cache.cache_key(own_source, spec, torch.float32)
    base = quantized_base(own_source, spec, progress=False)
    assert base.cache_key is None and len(quant_layers(base.model)) == 14
    assert not [p for p in cache_root().iterdir() if p.name.startswith((key, f".{key}.")) and p.is_dir()]
    (said,) = unwritable_warnings(caplog)
    assert "(No space left on device)" in said
    monkeypatch.undo()
    again = quantized_base(own_source, spec, progress=False)
    assert again.cache_key == key and again.fingerprint == base.fingerprint
    assert (cache_root() / key / RECORD_FILE).is_file()


CACHED_BASE = """
import sys
from lowbit_ft.formats.cache import quantized_base
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.spec import QuantSpec
base = quantized_base(sys.argv[1], QuantSpec(bits=4, group_size=32), progress=False)
print(base.cache_key, len(quant_layers(base.model)))
"""


def test_a_cache_the_kernel_refuses_to_fill_is_no_cache(own_source, tmp_path):
    """No patched writer: the base built under a 4 MiB file size limit (its entry needs more). The kernel's
    refusal reaches the cache as the OSError it is (safetensors raised a SafetensorError, which the cache did not
    catch: the run died); one warning, the base in hand, no entry or partial one in the cache."""
    import subprocess
    import sys

    from .test_cli import file_size_limit

    root = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", CACHED_BASE, own_source], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LOWBIT_FT_CACHE": str(root)},
                         preexec_fn=file_size_limit(4 << 20))
    assert run.returncode == 0 and run.stdout.split()[-2:] == ["None", "14"], run.stderr[-3000:]
    assert f"cache {root / 'bases'} cannot be written (File too large): going on without caching" in run.stderr
    assert not [p for p in (root / "bases").iterdir() if p.is_dir()]


def test_a_cache_entry_missing_its_record_is_built_again(own_source, caplog):
    """An entry without lowbit_base.json (interrupted or altered) is replaced, not a block on every later run
    (was: 'pass --overwrite', an option fit does not have)."""
    spec = QuantSpec(bits=4, group_size=32)
    first = quantized_base(own_source, spec, progress=False)
    entry = cache_root() / first.cache_key
    (entry / RECORD_FILE).unlink()
    again = quantized_base(own_source, spec, progress=False)
    assert again.cache_key == first.cache_key and again.fingerprint == first.fingerprint
    assert json.loads((entry / RECORD_FILE).read_text())["fingerprint"] == first.fingerprint
    assert any(f"base cache entry {entry} has no {RECORD_FILE}" in r.getMessage() for r in caplog.records)


def test_a_quantized_base_whose_layout_disagrees_with_the_plugin_is_an_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "int3"
    main(["quantize", "--model", str(tiny_model_dir), "--bits", "3", "--group_size", "32", "--output", str(out)])
    with pytest.raises(SystemExit):
        main(fit_args(out, "--trainer.plugins.init_args.group_size", "32"))
    err = capsys.readouterr().err
    assert (f"model.base='{out}' is already quantized as INT3 (1×32 blocks), but the LowBitPrecision plugin asks "
            "for INT4 (1×32 blocks)") in err


# --- defects -----------------------------------------------------------------------------------------
def test_merge_dense_keeps_the_models_dtype():
    model = quantize_model(make_tiny_llama(), BlockLayout.group(4, 32), progress=False)
    attach(model, "lora", r=4)
    merge_dense(model)
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert model(tokens).logits.dtype == torch.float32  # was bf16 Linears in a float32 model: a dtype error


def test_load_quantized_computes_in_the_stored_dtype(tmp_path):
    model = quantize_model(make_tiny_llama(), BlockLayout.group(4, 32), progress=False)
    save_lowbit(model, tmp_path / "fp32", dtype=torch.float32)
    reloaded = load_quantized(tmp_path / "fp32")
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32  # was float16
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_gptq_calibrates_per_record_on_a_file_of_short_records(tiny_model_dir, tmp_path, smol_tokenizer):
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(128)))
    concat = QuantSpec(method="gptq", calibration_data=str(data), calibration_samples=128, calibration_length=64)
    with pytest.raises(ValueError, match="or set calibration_mode=per_record"):
        calibration_batches(smol_tokenizer, concat)
    per_record = QuantSpec(**{**concat.to_dict(), "calibration_mode": "per_record", "group_size": 32})
    batches = calibration_batches(smol_tokenizer, per_record)
    assert len(batches) == 128 and all(b.shape[0] == 1 and 1 <= b.shape[1] <= 64 for b in batches)
    base = quantized_base(str(tiny_model_dir), per_record, cache=False, progress=False)
    assert len(quant_layers(base.model)) == 14


# --- fit → checkpoint → export: one base, verified --------------------------------------------------
def _forbid_gptq(monkeypatch):
    def no_gptq(*args, **kwargs):
        raise AssertionError("GPTQ ran again")

    monkeypatch.setattr(lowbit_ft.quant.gptq, "gptq_quantize_model", no_gptq)


def _logits(path_or_model, tokens):
    model = load_quantized(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        return model(tokens).logits


def test_gptq_fit_exports_from_its_cached_base_and_refuses_another(tiny_model_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "float-base"
    shutil.copytree(tiny_model_dir, src)
    monkeypatch.chdir(tmp_path)
    gptq = ["--trainer.plugins.init_args.method", "gptq", "--trainer.plugins.init_args.group_size", "32",
            "--trainer.plugins.init_args.calibration_samples", "4", "--trainer.plugins.init_args.calibration_length",
            "32"]
    main(fit_args(src, *gptq, steps=4))
    ckpt = tmp_path / "out/quickstart/version_0/checkpoints/last.ckpt"
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["lowbit_base"]
    assert record["spec"]["method"] == "gptq" and record["spec"]["calibration_data"] == "builtin:demo"
    entry = cache_root() / record["cache_key"]
    assert json.loads((entry / RECORD_FILE).read_text())["fingerprint"] == record["fingerprint"]

    # export and validate rebuild the base from the cache: GPTQ does not run again
    _forbid_gptq(monkeypatch)
    capsys.readouterr()
    main(["export", "--checkpoint", str(ckpt), "--output", "merged", "--dtype", "float32"])
    assert "merged/top1_agreement=1" in capsys.readouterr().out
    main(["validate", *fit_args(src, *gptq)[1:], "--ckpt_path", str(ckpt)])
    module = module_from_checkpoint(ckpt)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    adapter_on, merged = _logits(module.model, tokens), _logits(tmp_path / "merged", tokens)
    assert (merged - adapter_on).norm() / adapter_on.norm() < 1e-5
    assert torch.equal(merged.argmax(-1), adapter_on.argmax(-1))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # the cache entry moves away and the float model at model.base changes: quantized again, it is not the
    # base the adapters were trained on, and export says so with both fingerprints
    moved = shutil.move(entry, tmp_path / "moved-base")
    shutil.rmtree(src)
    make_tiny_llama(seed=1, vocab=49152).save_pretrained(src)
    shutil.copy(tiny_model_dir / "tokenizer.json", src)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", src)
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", "other"])
    err = capsys.readouterr().err
    assert f"fingerprint {record['fingerprint'][7:19]}): point model.base (export: --base) at that base" in err
    assert re.search(r"\(fingerprint [0-9a-f]{12}\) is not the one this checkpoint was trained on", err), err
    assert not (tmp_path / "other").exists()

    # --base at the moved base: accepted, and the same merged model comes out
    _forbid_gptq(monkeypatch)
    main(["export", "--checkpoint", str(ckpt), "--output", "again", "--dtype", "float32", "--base", str(moved)])
    assert torch.equal(_logits(tmp_path / "again", tokens), merged)


def test_qa_hira_on_a_gptq_8x4_base_is_two_commands_and_a_moved_base_needs_base(tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """The QA-HiRA recipe on a tiny model: `quantize` writes GPTQ (8, 4) in the lowbit format, `fit` trains
    on it, export refuses once the base has moved and accepts --base."""
    monkeypatch.chdir(tmp_path)
    main(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group_size", "4", "--block_out", "8",
          "--method", "gptq", "--calibration_samples", "4", "--calibration_length", "32", "--output", "gptq-8x4"])
    assert "saved (lowbit)" in capsys.readouterr().out
    main(["fit", "--config", str(RECIPES / "llama2_7b_qa_hira_int4.yaml"), "--model.base", "gptq-8x4",
          "--data.path", "builtin:demo", "--data.limit", "24", "--data.max_length", "128", "--data.val_fraction", "0.2",
          "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--trainer.callbacks.every_n_train_steps", "2", "--model.optimizer", "adamw", "--model.r", "4",
          "--model.gradient_checkpointing", "false"])
    ckpt = tmp_path / "out/llama2_7b_qa_hira_int4/version_0/checkpoints/last.ckpt"
    shutil.move(tmp_path / "gptq-8x4", tmp_path / "elsewhere")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--output", "merged"])
    assert "its base 'gptq-8x4' is not there (moved?): pass --base" in capsys.readouterr().err
    main(["export", "--checkpoint", str(ckpt), "--output", "merged", "--base", "elsewhere"])
    assert "merged/top1_agreement=1" in capsys.readouterr().out


def test_the_paper_recipe_runs_gptq_from_the_recipe(tiny_model_dir, tmp_path, monkeypatch):
    """recipes/llama7b_int4.yaml on a tiny model: one command, GPTQ calibrated on the training data."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPES / "llama7b_int4.yaml"), "--model.base", str(tiny_model_dir),
          "--data.path", "builtin:demo", "--data.limit", "24", "--data.max_length", "128", "--data.val_fraction", "0.2",
          "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--trainer.callbacks.every_n_train_steps", "2", "--model.optimizer", "adamw", "--model.r", "4",
          "--model.gradient_checkpointing", "false", "--trainer.plugins.init_args.calibration_samples", "4",
          "--trainer.plugins.init_args.calibration_length", "32"])
    ckpt = tmp_path / "out/llama7b_int4/version_0/checkpoints/last.ckpt"
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["lowbit_base"]
    assert record["spec"]["method"] == "gptq" and record["layout"] == "INT4 (1×32 blocks)"
