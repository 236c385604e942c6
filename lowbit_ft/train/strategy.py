"""FSDP2 for a packed base: every decoder block's codes, scales, zeros and adapters sharded over the ranks.

    trainer:
      devices: 8
      strategy: lowbit_ft.FSDP2Strategy

Why FSDP2 (`torch.distributed.fsdp.fully_shard`) and not FSDP1: FSDP1 flattens every parameter of a wrapped module
into one FlatParameter, which must have a single dtype and one requires_grad; a block here mixes int32 codes,
float16 scales, float32 zeros and trainable bf16 adapters, so FSDP1 would need a wrapper per dtype group (or the
codes stored as float, 2-8x their size) and `use_orig_params` to keep the adapters' own gradients. FSDP2 shards
each parameter on its own along dim 0 (a rank holds a slice of the rows of each packed tensor, whatever its
dtype) and leaves frozen ones frozen: the packed tensors become frozen parameters, the adapters stay trainable.

Checkpoints stay what a single process writes: the adapters and their optimizer state, gathered whole, in one
file, so a run resumes on any number of ranks (and `lowbit-ft export` reads it as any other checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from lowbit_ft.quant.blocks import decoder_blocks
from lowbit_ft.quant.modules import quant_layers

MIN_TORCH = (2, 6)  # fully_shard under torch.distributed.fsdp, and DTensor optimizer states


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every device of the run (data parallel; no tensor parallelism): each decoder block of the packed
    base (codes, scales, zeros) and its adapters sharded across the ranks, gathered block by block for its forward
    and backward. Checkpoints hold the adapters only, gathered, as a single process writes them.

    Args:
        process_group_backend: nccl on GPUs, gloo on CPUs (default: by device).
        timeout_minutes: how long a rank waits in a collective, e.g. while rank 0 quantizes the base for the
            cache before the others read it (GPTQ of a 70B takes hours: build it first with lowbit-ft quantize,
            or raise this).
    """

    def __init__(self, process_group_backend: str | None = None, timeout_minutes: float = 30.0) -> None:
        if _torch_version() < MIN_TORCH:
            raise ValueError(f"trainer.strategy FSDP2Strategy needs torch ≥ {'.'.join(map(str, MIN_TORCH))} "
                             f"(fully_shard), this is {torch.__version__}: upgrade torch or use strategy: ddp")
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timedelta(minutes=timeout_minutes))

    def setup_environment(self) -> None:
        # one data-parallel mesh dimension over every process (Lightning's default would be tensor parallel)
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # load_optimizer_state_dict below places the saved state on this run's shards

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters (the adapters), gathered whole on the CPU of every rank (rank 0 writes them)."""
        return {name: _full(p).cpu() for name, p in self.lightning_module.named_parameters() if p.requires_grad}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state as a single process's `state_dict()`: every sharded tensor gathered whole."""
        state = getattr(optimizer, "_optimizer", optimizer).state_dict()
        return {**state, "state": {index: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                                   for index, s in state["state"].items()}}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint file as a single process reads it; the hooks below place its tensors on the shards."""
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Each rank copies its own rows of every saved adapter tensor (all ranks read the same file)."""
        saved = checkpoint["state_dict"]
        with torch.no_grad():
            for name, param in self.lightning_module.named_parameters():
                if name in saved:
                    param.copy_(_like(saved[name], param))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {index: {k: _like(v, params[index]) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
                     for index, s in saved["state"].items()}
            optimizer.load_state_dict({**saved, "state": state})


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor) laid out as `param` is: this rank's shard for a DTensor, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full


def shard_check(model_config, targets, block_out: int, ranks: int) -> None:
    """Before anything loads: FSDP2 shards each packed tensor by rows, so every quantized linear's rows (and its
    scale rows, out / block_out) must divide evenly over `ranks`; one line naming the first that does not."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    rows = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim,
            "o_proj": model_config.hidden_size, "gate_proj": model_config.intermediate_size,
            "up_proj": model_config.intermediate_size, "down_proj": model_config.hidden_size}
    for name, out in rows.items():
        if name not in targets:
            continue
        for what, count in (("rows", out), ("scale rows", out // block_out)):
            if count % ranks:
                fits = [n for n in (1, 2, 4, 8, 16) if all(r % n == 0 and (r // block_out) % n == 0
                                                           for k, r in rows.items() if k in targets)]
                raise ValueError(f"trainer.devices={ranks}: FSDP2Strategy shards {name}'s {count} {what} over the "
                                 f"ranks, and {ranks} does not divide them; use devices in {fits} or strategy: ddp")


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """Apply FSDP2 to a quantized HF LLaMA-family model with adapters attached, in place: each decoder block its
    own unit (gathered for its forward and backward only), the embeddings and final norm with `model.model`. The
    packed tensors become frozen parameters so FSDP2 shards them. The lm_head (frozen, float) stays whole on every
    rank: the loss calls it once per chunk of counted tokens, a number that differs between ranks, and a sharded
    head would all-gather that many times, which ranks must do in step (the memory table counts it under
    "+ gathered"). Tied embeddings are that same tensor, so they stay whole too."""
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    if not len(blocks):
        raise ValueError(f"FSDP2Strategy: {type(model).__name__} has no model.layers decoder blocks to shard; "
                         "use strategy: ddp")
    for layer in quant_layers(model).values():
        for name, buffer in list(layer.named_buffers(recurse=False)):
            if buffer is not None:
                del layer._buffers[name]
                layer.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    fully_shard(model.model, mesh=mesh, ignored_params={head.weight} if head.weight is embeddings.weight else None)
    return model
