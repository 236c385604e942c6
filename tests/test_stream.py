"""Building the packed base from a float checkpoint one decoder block at a time (`lowbit_ft.formats.stream`):
the same codes as quantizing the whole model, with at most one float block in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit_ft.formats.cache import fingerprint
from lowbit_ft.formats.load import load_model
from lowbit_ft.formats.stream import open_float
from lowbit_ft.quant.blocks import BlockVisitor, Visitors, decoder_blocks
from lowbit_ft.quant.modules import quant_layers
from lowbit_ft.quant.report import logits_of, quantize_and_report
from lowbit_ft.quant.spec import QuantSpec

from .conftest import make_tiny_llama


@pytest.fixture
def sharded_dir(tmp_path):
    """A tiny float LLaMA (3 blocks) saved as bf16 shards small enough that blocks span several files."""
    model = make_tiny_llama(seed=3, layers=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "float", max_shard_size="40KB")
    assert len(list((tmp_path / "float").glob("*.safetensors"))) > 3
    return tmp_path / "float"


class FloatBlocksSeen(BlockVisitor):
    """Records, whenever a pass enters a block, how many decoder blocks hold float linear weights."""

    def __init__(self):
        self.counts = []

    def before(self, index, block):
        self.counts.append(sum(any(p.is_floating_point() and not p.is_meta and p.dim() == 2
                                   for p in b.parameters()) for b in decoder_blocks(self.model)))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_streamed_base_has_the_codes_of_the_whole_model_and_one_float_block_at_a_time(sharded_dir, method):
    spec = QuantSpec(bits=3, group_size=32, method=method, calibration_samples=2, calibration_length=16)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))]

    def quantize(model, visitor):
        if method == "rtn":
            return spec.quantize(model, progress=False, visitor=visitor)
        from lowbit_ft.quant.gptq import gptq_quantize_model
        return gptq_quantize_model(model, spec.layout, batches, progress=False, visitor=visitor)

    whole, _ = load_model(str(sharded_dir), torch.float32)
    quantize(whole, None)
    streamed, _, reader = open_float(str(sharded_dir), torch.float32)
    assert reader is not None and all(p.is_meta for p in decoder_blocks(streamed).parameters())
    seen = FloatBlocksSeen()
    seen.model = streamed
    quantize(streamed, Visitors(reader, seen))
    assert seen.counts == [1, 1, 1]  # the block being quantized; those before it are packed, those after unread
    assert fingerprint(streamed) == fingerprint(whole)
    for (name, a), (_, b) in zip(whole.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = batches[0]
    assert torch.equal(logits_of(whole, {"input_ids": ids}), logits_of(streamed, {"input_ids": ids}))


def test_the_report_measured_block_by_block_equals_whole_model_forwards(sharded_dir):
    """The report's float and quantized logits come from the quantizing pass itself: the same numbers as a
    forward of the float model before and of the packed model after."""
    batch = {"input_ids": torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 12])}
    spec = QuantSpec(bits=2, group_size=32)
    whole, _ = load_model(str(sharded_dir), torch.float32)
    reference = logits_of(whole, batch)
    spec.quantize(whole, progress=False)
    quantized = logits_of(whole, batch)
    mask = batch["attention_mask"].bool()
    expected = float((quantized[mask] - reference[mask]).norm() / reference[mask].norm())
    streamed, _, reader = open_float(str(sharded_dir), torch.float32)
    report = quantize_and_report(streamed, batch, spec, reader=reader)
    assert report.relative_logit_error == pytest.approx(expected, rel=1e-5)
    assert expected > 0.05  # INT2: far from zero, so a report that compared a model with itself would fail
    assert report.quantized_layers == len(quant_layers(whole)) == 21


def test_a_block_missing_from_the_shards_is_named_before_it_is_needed(sharded_dir):
    index_file = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    victim = "model.layers.1.mlp.down_proj.weight"
    file = sharded_dir / index["weight_map"].pop(victim)
    tensors = load_file(file)
    del tensors[victim]
    save_file(tensors, file, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    model, _, reader = open_float(str(sharded_dir), torch.float32)
    with pytest.raises(ValueError, match=r"checkpoint lacks model\.layers\.1\.mlp\.down_proj\.weight"):
        QuantSpec(bits=4, group_size=32).quantize(model, progress=False, visitor=reader)


def test_shards_for_more_blocks_than_the_config_has_are_refused_at_open(sharded_dir):
    config = json.loads((sharded_dir / "config.json").read_text())
    (sharded_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"num_hidden_layers is 2 but the weights hold 3 decoder layers"):
        open_float(str(sharded_dir), torch.float32)


def test_tensor_file_reads_what_safetensors_wrote_and_names_damage(tmp_path):
    from lowbit_ft.formats.tensor_file import TensorFile

    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "i32": torch.arange(12).int(),
               "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "f16": torch.randn(2, 2, 2).half(),
               "empty": torch.zeros(0, 4), "bool": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    read = TensorFile(tmp_path / "t.safetensors")
    assert sorted(read.keys()) == sorted(tensors)
    for name, tensor in tensors.items():
        got = read.get_tensor(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"cut\.safetensors: tensor \w+ lies outside the file"):
        TensorFile(tmp_path / "cut.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match=r"huge\.safetensors: not a safetensors file \(no header of a plausible"):
        TensorFile(tmp_path / "huge.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=r"tiny\.safetensors: not a safetensors file"):
        TensorFile(tmp_path / "tiny.safetensors")
    with torch.device("meta"):  # Lightning builds models under a device context: the reads stay on the CPU
        assert torch.equal(read.get_tensor("bf16"), tensors["bf16"])


def test_the_fingerprint_unpacked_a_slice_at_a_time_is_the_fingerprint(monkeypatch):
    """Codes are unpacked FINGERPRINT_ROWS rows at a time (bounded temporaries); the digest sees the same bytes in
    the same order, so recorded fingerprints stay valid."""
    import lowbit_ft.formats.cache as cache
    from lowbit_ft.quant.convert import quantize_model
    from lowbit_ft.quant.layout import BlockLayout

    model = make_tiny_llama()
    quantize_model(model, BlockLayout(3, 1, 32), progress=False)
    whole = cache.fingerprint(model)
    monkeypatch.setattr(cache, "FINGERPRINT_ROWS", 16)
    assert cache.fingerprint(model) == whole
