"""bench/scale.py's model writer and bench/memory_table.py's figures (tiny sizes; the measured runs are
bench/RESULTS.md's, never asserted here)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"


def bench_module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_the_written_random_llama_loads_in_transformers_with_every_key(tmp_path):
    """Sharded bf16 safetensors + index + config + SmolLM2's tokenizer: AutoModelForCausalLM loads every tensor
    (no missing or unexpected key) with the values written, and AutoTokenizer the tokenizer."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scale = bench_module("scale")
    shape = scale.Shape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)
    model_dir = tmp_path / "model"
    index = scale.write_model(model_dir, shape, seed=3, max_shard_bytes=3 * 2**20)  # embeddings, blocks, lm_head
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    assert index["metadata"]["total_size"] == sum(2 * scale._numel(d) for _, d in scale.tensor_plan(shape))
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert scale.model_matches(model_dir, scale.marker_for(shape, 3, 0.02, 3 * 2**20, "smollm2"))
    assert not scale.model_matches(model_dir, scale.marker_for(shape, 4, 0.02, 3 * 2**20, "smollm2"))

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert set(state) == set(index["weight_map"]) and state["lm_head.weight"].dtype == torch.bfloat16
    key = "model.layers.1.mlp.down_proj.weight"
    with safe_open(model_dir / index["weight_map"][key], "pt") as f:
        written = f.get_tensor(key)
    assert written.shape == (64, 128) and torch.equal(state[key], written)
    assert 0.015 < float(written.float().std()) < 0.025 and torch.equal(state["model.norm.weight"], torch.ones(64))
    assert not torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])  # untied, own draws
    assert len(AutoTokenizer.from_pretrained(model_dir)) == shape.vocab == 49152


def test_the_writer_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    scale = bench_module("scale")
    with pytest.raises(ValueError, match="smaller than"):
        scale.write_model(tmp_path / "m", scale.Shape(64, 1, 128, 4, 2, vocab=256))
    assert not (tmp_path / "m").exists()


def test_the_fit_config_and_the_default_shape(tmp_path):
    """The fit config is the quickstart recipe made short, bf16 and without validation."""
    scale = bench_module("scale")
    args = scale.parse_args(["--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4",
                             "--fit_steps", "3"])
    config = scale.fit_config(args, tmp_path / "model", tmp_path / "runs")
    assert config["trainer"]["max_steps"] == 3 and config["trainer"]["limit_val_batches"] == 0
    assert config["trainer"]["plugins"][0]["init_args"]["dtype"] == "bfloat16"
    assert config["model"]["base"] == str(tmp_path / "model")
    assert scale.parse_args([]).shape == scale.Shape(2048, 16, 5632, 16, 16, 49152)


def test_7b_int4_g64_block_equals_the_layout_by_hand():
    """The seven packed linears of one LLaMA-2-7B block at INT4 g64, from QuantLinear's buffers, against
    codes in·out·4/8 + scales (out·in/64)·2 (float16) + zeros (out·in/64)·4 (float32) by hand."""
    table = bench_module("memory_table")
    shape = table.MODELS["LLaMA-2 7B"]
    by_hand = 0
    for i, o in [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]:
        by_hand += i * o * 4 // 8 + (o * i // 64) * 2 + (o * i // 64) * 4
    from_buffers = sum(table.packed_linear_bytes(i, o, 4, 64) for i, o in shape.linears().values())
    assert from_buffers == by_hand == 120_160_256
    assert table.block_bytes(shape, 4, 64) == by_hand + 2 * 4096 * 2  # + the two bf16 RMSNorm weights
    assert table.base_bytes(shape, 4, 64) == 32 * table.block_bytes(shape, 4, 64) + 2 * 32000 * 4096 * 2 + 4096 * 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fsdp2_shards_are_ddp_divided_by_the_ranks(bits):
    """Per rank under FSDP2 ≤ DDP / ranks + the dim-0 padding (at most a row per tensor), for every model."""
    table = bench_module("memory_table")
    for row in table.rows(models=table.MODELS, bits=(bits,)):
        for ranks, shard in row.fsdp.items():
            assert row.ddp / ranks <= shard <= row.ddp / ranks * 1.001 + 2**20, (row.model, ranks)
    assert table.smallest_gpu(23 * 2**30) == "24 GB" and table.smallest_gpu(23.5 * 2**30) == "40 GB"
    assert table.smallest_gpu(200 * 2**30) == "none"
