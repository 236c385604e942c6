"""Walking a HF LLaMA-family model one decoder block at a time.

A block-by-block pass (RTN, GPTQ, the quant_error start) calls a `BlockVisitor` around each decoder block, in
order. That is how a model bigger than memory is built: a streaming reader fills block i's weights in `before`,
the pass packs them, and nothing else of the float model exists at that moment (`lowbit_ft.formats.stream`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

_BLOCK_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class BlockVisitor:
    """What a block-by-block pass calls around decoder block `index`: `before` ahead of touching its weights,
    `after` once the pass is done with it (its linears packed). The base class does nothing."""

    def before(self, index: int, block: nn.Module) -> None:
        pass

    def after(self, index: int, block: nn.Module) -> None:
        pass


class Visitors(BlockVisitor):
    """Several visitors in order (`before` and `after` both in the order given)."""

    def __init__(self, *visitors: BlockVisitor | None) -> None:
        self.visitors = [v for v in visitors if v is not None]

    def before(self, index: int, block: nn.Module) -> None:
        for visitor in self.visitors:
            visitor.before(index, block)

    def after(self, index: int, block: nn.Module) -> None:
        for visitor in self.visitors:
            visitor.after(index, block)


class DropBlocks(BlockVisitor):
    """Frees each block once a pass is done with it (its tensors go to the meta device): for a read-only model,
    such as the float reference of the quant_error start, which is then never whole in memory."""

    def after(self, index: int, block: nn.Module) -> None:
        block.to("meta")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF LLaMA-family causal LM (`model.model.layers`); empty for other modules."""
    return getattr(getattr(model, "model", None), "layers", None) or nn.ModuleList()


def block_index(name: str) -> int | None:
    """The decoder block a module name lies in ('model.layers.3.mlp.up_proj' → 3), None outside the blocks."""
    found = _BLOCK_NAME.match(name)
    return int(found.group(1)) if found else None


class _Stop(Exception):
    pass


def block_inputs(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """What the first decoder block receives for `ids`: the embeddings and the keyword arguments (mask, rotary
    embeddings) the model computes for them. The blocks themselves never run (they may not be loaded yet)."""
    captured: dict = {}

    def grab(_module, args, kwargs):
        captured["hidden"], captured["kwargs"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise _Stop

    device = model.get_input_embeddings().weight.device
    handle = decoder_blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids.to(device), use_cache=False,
              attention_mask=None if attention_mask is None else attention_mask.to(device))
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def hidden_of(output) -> torch.Tensor:
    """A decoder block's hidden-state output (transformers versions differ: a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    """Each module's forward hook registered for the `with` body, and removed after it, also on errors."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def to_device(value, device: torch.device):
    """`value` (tensors inside tuples, lists and dicts) moved to `device`."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class LogitProbe(BlockVisitor):
    """Rides along a quantizing pass to measure it: a fixed batch runs through each float block (in `before`) and
    through the same block once packed (in `after`), so the float and the quantized logits come out of one pass
    without a second copy of the model."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model = model
        hidden, self.kwargs = block_inputs(model, batch["input_ids"], batch.get("attention_mask"))
        self.float_hidden = self.quant_hidden = hidden

    @torch.no_grad()
    def before(self, index: int, block: nn.Module) -> None:
        self.float_hidden = hidden_of(block(self.float_hidden, **self.kwargs))

    @torch.no_grad()
    def after(self, index: int, block: nn.Module) -> None:
        self.quant_hidden = hidden_of(block(self.quant_hidden, **self.kwargs))

    @torch.no_grad()
    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float logits, quantized logits), float32."""
        norm, head = self.model.model.norm, self.model.get_output_embeddings()
        return head(norm(self.float_hidden)).float(), head(norm(self.quant_hidden)).float()
