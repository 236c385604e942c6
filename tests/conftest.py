"""Shared fixtures: seeded tiny random LLaMA models (no download)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter. Triton reads this when it is first imported
    # (transformers' optional integrations import it early), so it is set before anything else loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def make_tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 256, tie: bool = False) -> LlamaForCausalLM:
    """A random LLaMA small enough for every test; 64/128-wide so 3-bit packing (×32) fits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _register_readme_adapter() -> None:
    """Run README's custom-adapter example, so the parametrized adapter tests cover it too."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- example: custom adapter -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md (custom adapter example)", "exec"), {"__name__": "readme_example"})


_register_readme_adapter()


@pytest.fixture(scope="session")
def smollm2_float():
    """(model, tokenizer): the built-in SmolLM2-135M-Instruct in float32, loaded once (~35 s) for the whole
    session. Shared: a test that changes the model works on copy.deepcopy(model)."""
    from lowbit_ft import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer (byte-level BPE, 49,152 tokens, a chat template), as transformers builds it."""
    from lowbit_ft.formats.load import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved with SmolLM2's tokenizer (vocab 49,152): a real `model.base` for fits."""
    from lowbit_ft.formats.load import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(vocab=49152).save_pretrained(path)
    load_tokenizer("smollm2").save_pretrained(path)
    return path


def make_adapted_llama(name: str = "qa_lora", layout=None, tie: bool = False, scale: float = 0.1, vocab: int = 256,
                       **hparams):
    """A tiny LLaMA quantized to INT4 ((8, 4) blocks for QA-HiRA, g = 32 otherwise) with adapter `name`
    attached and random non-zero adapter weights, so merges have something to merge. vocab=49152 fits
    SmolLM2's tokenizer (the `smol_tokenizer` fixture), which the GGUF export writes into the file."""
    from lowbit_ft import BlockLayout, quantize_model
    from lowbit_ft.adapters import attach

    model = make_tiny_llama(tie=tie, vocab=vocab)
    layout = layout or (BlockLayout(4, 8, 4) if name == "qa_hira" else BlockLayout.group(4, 32))
    quantize_model(model, layout, progress=False)
    attach(model, name, **{"r": 4, **hparams})
    randomize_adapters(model, seed=0, scale=scale)
    return model


def randomize_adapters(model, seed: int = 0, scale: float = 0.1) -> None:
    """Seeded random non-zero adapter weights, so merges have something to merge. Under sum pooling the last
    factor (B, H) is divided by the pooled run length bi: ΔW is then the size it has under mean pooling
    (what these fixtures were sized for: e.g. merged zeros that stay within the code range)."""
    import torch

    from lowbit_ft.adapters import adapted_layers

    g = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(model).values():
        adapter = layer.adapter
        for name, p in adapter.named_parameters():
            shrink = adapter.tile[1] if adapter.pooling == "sum" and name in ("lora_B", "hira_H") else 1
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale / shrink)


# quantized bases built by fits go to a per-session cache, never to the user's ~/.cache (subprocesses inherit
# it); it holds hundreds of MB, so it goes when the session ends
_SESSION_CACHE = tempfile.mkdtemp(prefix="lowbit-ft-cache-")
os.environ["LOWBIT_FT_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
