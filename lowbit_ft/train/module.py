"""`LowBitModule`: the LightningModule that fine-tunes adapters on a packed low-bit base.

To try a new adapter design, subclass and override the hooks (each documented below):
`load_base_model` (where the model comes from), `configure_adapters` (what trains),
`compute_loss` (the objective). Everything else — checkpointing adapters only, metrics, optimizer
over trainable parameters, NaN guard — applies unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from transformers import AutoConfig

from lowbit_ft import adapters
from lowbit_ft.adapters.quant_error import init_from_quant_error
from lowbit_ft.checks import check_number
from lowbit_ft.formats.cache import QuantizedBase, check_digests, quantized_base, quantized_source, short
from lowbit_ft.formats.stream import open_float
from lowbit_ft.quant.modules import DEFAULT_TARGETS, quant_layers
from lowbit_ft.quant.spec import QuantSpec, calibration_batches
from lowbit_ft.records import BUILTIN_DEMO, model_inputs, next_token_labels
from lowbit_ft.train.checkpoint_io import AtomicCheckpointIO
from lowbit_ft.train.loss import chunked_cross_entropy
from lowbit_ft.train.precision import LowBitPrecision
from lowbit_ft.train.strategy import shard_check, shard_model


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and the last checkpoint written before stays."""


class LowBitModule(L.LightningModule):
    """Fine-tune an adapter on a low-bit LLaMA-family base.

    Args:
        base: 'smollm2' (built-in SmolLM2-135M-Instruct), a HF model directory, a GPTQ directory, or a .gguf file.
        adapter: adapter name from lowbit_ft.adapters.REGISTRY: lora, qa_lora, q_bara, qa_hira.
        r: adapter rank.
        alpha: adapter scale numerator (the output is scaled by alpha / r).
        dropout: dropout on the adapter's pooled input.
        adapter_args: further adapter hyper-parameters, e.g. {group_size: 64} or {block_out: 8, group_size: 4}.
        targets: which linears get adapters (last name component); default all quantized ones.
        optimizer: adamw, or paged_adamw / adamw_8bit (need bitsandbytes on CUDA).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        scheduler: constant (the QA-LoRA paper) or cosine (decays to 0 at trainer.max_steps).
        warmup_steps: linear warm-up steps before the schedule.
        gradient_checkpointing: recompute activations in backward to save memory.
        init: how the adapters start. zero: ΔW = 0, step 0 is the quantized base. quant_error: the block-constant
            ΔW that best undoes the base's rounding error on the training data's inputs (least squares under
            each layer's input Gram matrix; rank-r for low-rank adapters). Needs the float model as model.base
            quantized by the plugin with method rtn (on GPTQ bases it was measured to hurt).
    """

    def __init__(self, base: str = "smollm2", adapter: str = "qa_lora", r: int = 64, alpha: float = 16.0,
                 dropout: float = 0.0, adapter_args: dict | None = None, targets: list[str] | None = None,
                 optimizer: Literal["adamw", "paged_adamw", "adamw_8bit"] = "adamw", lr: float = 2e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 scheduler: Literal["constant", "cosine"] = "constant", warmup_steps: int = 0,
                 gradient_checkpointing: bool = False, init: Literal["zero", "quant_error"] = "zero") -> None:
        super().__init__()
        try:
            adapters.get_adapter_class(adapter)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if scheduler not in ("constant", "cosine"):
            raise ValueError(f"model.scheduler={scheduler!r} is unknown: use 'constant' or 'cosine'")
        if optimizer not in ("adamw", "paged_adamw", "adamw_8bit"):
            raise ValueError(f"model.optimizer={optimizer!r} is unknown: use adamw, paged_adamw or adamw_8bit")
        check_number("model.r", r, minimum=1, integer=True)
        check_number("model.alpha", alpha, above=0)
        check_number("model.dropout", dropout, minimum=0, below=1)
        check_number("model.lr", lr, above=0)
        check_number("model.weight_decay", weight_decay, minimum=0)
        for i, beta in enumerate(betas):
            check_number(f"model.betas[{i}]", beta, minimum=0, below=1)
        check_number("model.warmup_steps", warmup_steps, minimum=0, integer=True)
        if init not in ("zero", "quant_error"):
            raise ValueError(f"model.init={init!r} is unknown: use 'zero' or 'quant_error'")
        self.save_hyperparameters()
        self.model: nn.Module | None = None
        self.base: QuantizedBase | None = None  # the quantized base and its identity (set by build_model)
        self.trained_template: str | None = None  # data.template a checkpoint recorded: generate / eval prompt so
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        self.val_loss = torchmetrics.MeanMetric()
        self.val_accuracy = torchmetrics.MeanMetric()
        self._step_started = None
        self._whole: tuple[int, nn.Module | None] | None = None  # (global step, whole_model() then)
        self._window_tokens = torch.zeros((), dtype=torch.long)
        self._last_loss = torch.zeros(())

    # --- hooks a subclass overrides -----------------------------------------------------------
    def load_base_model(self, spec: QuantSpec | None, dtype: torch.dtype, *, cache: bool = True,
                        cache_key: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """Return the quantized base causal LM on `device`: model.base quantized as `spec` (the plugin's QuantSpec)
        says, in `dtype` — read back from the base cache when a run built it before (`cache`; `cache_key`: the
        entry a checkpoint recorded) — or as stored when model.base is a GPTQ / lowbit directory (`spec` None).
        Each block goes to `device` as it is read or packed. An override may return a float model: `spec` then
        quantizes it (RTN)."""
        where = (f"LowBitPrecision (bits={spec.bits}, group_size={spec.group_size}, block_out={spec.block_out})"
                 if spec else "model.base")
        self.base = quantized_base(self.hparams.base, spec, dtype, cache=cache, cache_key_hint=cache_key,
                                   where=where, device=device)
        return self.base.model

    def configure_adapters(self, model: nn.Module) -> nn.Module:
        """Attach the trainable adapters to the quantized model (default: `lowbit_ft.adapters.attach`)."""
        h = self.hparams
        try:
            return adapters.attach(model, h.adapter, targets=h.targets, r=h.r, alpha=h.alpha, dropout=h.dropout,
                                   **(h.adapter_args or {}))
        except ValueError as err:
            raise ValueError(f"model.adapter={h.adapter!r}: {err}") from None

    def compute_loss(self, batch: dict[str, torch.Tensor], predictions: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (mean loss over this batch's response tokens, next-token predictions or None). Prompt tokens carry
        label -100. `predictions`: also the argmax token at every predicting position, (B, T - 1), for validation.

        The cross-entropy goes through the vocabulary a chunk of positions at a time (`chunked_cross_entropy`), so
        the float32 logits of the whole batch never exist. The training step turns the mean back into a token sum
        and `on_before_optimizer_step` divides the gradients by the response tokens of the whole optimizer step —
        every micro-batch of the accumulation window on every rank — so accumulation and N processes both train
        exactly like one large batch."""
        body = self.model.model  # the decoder without its lm_head, which the loss applies chunk by chunk
        hidden = body(**model_inputs(batch)).last_hidden_state
        targets, _ = next_token_labels(batch["labels"])
        out = chunked_cross_entropy(hidden[:, :-1], self.model.get_output_embeddings(), targets,
                                    return_predictions=predictions)
        return out if predictions else (out, None)

    # --- Lightning ---------------------------------------------------------------------------
    @property
    def lowbit_precision(self) -> LowBitPrecision | None:
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        return plugin if isinstance(plugin, LowBitPrecision) else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        plugin, trainer = self.lowbit_precision, self._trainer
        spec = plugin.spec if plugin is not None else None
        if self.hparams.init == "quant_error":
            self._check_quant_error_start(spec)
        if spec is not None and spec.calibrated and spec.calibration_data is None:
            spec = dataclasses.replace(spec, calibration_data=self._training_data())
        sharded = isinstance(trainer.strategy if trainer else None, ModelParallelStrategy)
        if sharded:
            self._check_shardable(spec, trainer.world_size)
        # DDP and a single device: each block straight to the device; FSDP2 shards from the CPU
        device = trainer.strategy.root_device if trainer is not None and not sharded else torch.device("cpu")

        def build() -> None:
            self.build_model(spec, plugin.dtype if plugin else torch.float32, cache=plugin.cache if plugin else False,
                             device=device)
            if sharded:
                shard_model(self.model, self.device_mesh["data_parallel"])

        if trainer is not None and trainer.world_size > 1 and (sharded or (plugin is not None and plugin.cache)):
            # rank 0 first (it quantizes and writes the base cache) while the others wait; under FSDP2 the others
            # then load and shard one at a time, so a node's host memory holds one whole packed base at once
            turns = trainer.world_size if sharded else 2
            for turn in range(turns):
                if turn == min(trainer.global_rank, turns - 1):
                    build()
                trainer.strategy.barrier(f"lowbit_base_{turn}")
        else:
            build()
        if isinstance(trainer.strategy if trainer else None, DDPStrategy):
            # the packed base never changes: broadcasting its buffers every step would be pure waste
            trainer.strategy._ddp_kwargs.setdefault("broadcast_buffers", False)

    def _check_shardable(self, spec: QuantSpec | None, ranks: int) -> None:
        """Before anything loads: the base's layers must split evenly over the FSDP2 ranks."""
        if self.hparams.init == "quant_error":
            raise ValueError("model.init=quant_error is not available under FSDP2Strategy yet (it needs the whole "
                             "float model's statistics on every rank): use model.init=zero, or strategy: ddp")
        config_file = Path(str(self.hparams.base)) / "config.json"
        if config_file.is_file():
            config = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=False)
            shard_check(config, spec.targets if spec else DEFAULT_TARGETS, spec.block_out if spec else 1, ranks)

    def _check_quant_error_start(self, spec: QuantSpec | None) -> None:
        """Before anything loads: quant_error needs the float weights, and an RTN base."""
        if spec is None or quantized_source(str(self.hparams.base)):
            raise ValueError(f"model.init=quant_error needs the float weights, but model.base={self.hparams.base!r} "
                             "arrives quantized: point model.base at the float model and let LowBitPrecision "
                             "quantize it (method: rtn), or use model.init=zero")
        if spec.method != "rtn":
            raise ValueError(f"model.init=quant_error is for RTN bases, and the plugin says method={spec.method!r}: "
                             "on GPTQ bases the refit raised perplexity (GPTQ's codes already compensate errors "
                             "across columns; docs/results.md). Use method: rtn, or model.init=zero")

    def setup(self, stage: str) -> None:
        """Checkpoints are written by `AtomicCheckpointIO` unless the run configured its own CheckpointIO (an
        override calls super().setup)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self) -> None:
        if self.hparams.init == "quant_error" and self._trainer.ckpt_path is None:  # a resume has its weights
            self.start_from_quant_error()

    def start_from_quant_error(self) -> dict[str, float]:
        """Set the adapters to the quant_error start: the float model (model.base, loaded again) runs block by block
        on the calibration records (the plugin's calibration_data, else the training data; one sequence per
        record), and each adapter takes the block delta that best cancels its layer's rounding error there."""
        spec = dataclasses.replace(self.base.spec, calibration_data=self.base.spec.calibration_data
                                   or self._training_data(), calibration_mode="per_record")
        float_model, tokenizer, reader = open_float(str(self.hparams.base))
        batches = calibration_batches(tokenizer or self.base.tokenizer, spec)
        removed = init_from_quant_error(self.model, float_model.eval(), batches, damp=spec.damp, reader=reader,
                                        consume=True)
        del float_model, reader
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for param in self.model.parameters():  # every rank starts from rank 0's adapters exactly
                if param.requires_grad:
                    torch.distributed.broadcast(param.data, src=0)
        share = sum(removed.values()) / max(len(removed), 1)
        if self._trainer is None or self._trainer.is_global_zero:  # (no progress bar yet for self.print to use)
            print(f"init quant_error      the adapters cancel {share:.0%} of the rounding error on "
                  f"{len(batches)} calibration records (mean over {len(removed)} layers)", flush=True)
        return removed

    def _training_data(self) -> str:
        """The training data file, for GPTQ calibration when the plugin names none (absolute: it is recorded)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        path = getattr(getattr(datamodule, "hparams", None), "path", None)
        if path is None:
            raise ValueError("LowBitPrecision: set calibration_data (no training data file to "
                             "calibrate on)")
        return path if path == BUILTIN_DEMO else str(Path(path).resolve())

    def build_model(self, spec: QuantSpec | None, dtype: torch.dtype = torch.float32, *, cache: bool = True,
                    cache_key: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """Build the quantized base as `spec` says (None: model.base arrives quantized) and attach adapters:
        what `configure_model` does under a Trainer, callable without one (`lowbit-ft export` passes the
        spec and the cache entry a checkpoint recorded)."""
        self.base = None
        model = self.load_base_model(spec, dtype, cache=cache, cache_key=cache_key, device=device)
        if not quant_layers(model):  # an override returned a float model
            if spec is None:
                raise ValueError("trainer.plugins: add a lowbit_ft.LowBitPrecision plugin (bits, group_size) to "
                                 "quantize the base, or set model.base to a GPTQ checkpoint")
            model = spec.quantize(model, progress=False).to(dtype)
        if self.base is None or self.base.model is not model:
            self.base = QuantizedBase(model, None, str(self.hparams.base), spec, dtype)
        # quantized before adapters attach: they wrap QuantLinear, and must exist before DDP wraps the
        # model and the optimizer is built (Lightning calls convert_module later: a no-op)
        if self.hparams.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self.configure_adapters(model.train())  # loaders return eval mode; Lightning toggles it
        return self.model

    def forward(self, **batch):
        return self.model(**batch)

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the ranks (FSDP2Strategy or another ModelParallelStrategy)."""
        return self._trainer is not None and isinstance(self._trainer.strategy, ModelParallelStrategy)

    def whole_model(self) -> nn.Module | None:
        """The adapted model in one piece, for the merge check, exports and the adapter file. Unsharded runs: the
        model itself. Sharded: a collective (every rank calls it) after which rank 0 holds a copy on its CPU — the
        base read again from the cache entry this run built, adapter tensors gathered one at a time — and the
        other ranks None. The copy is kept until the next training batch starts."""
        if not self.sharded:
            return self.model
        if self._whole is None or self._whole[0] != self.global_step:
            adapters = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                        for name, p in self.model.named_parameters() if p.requires_grad}
            whole = None
            if self._trainer.is_global_zero:
                copy = type(self)(**{k: v for k, v in self.hparams.items() if not k.startswith("_")})
                copy.build_model(self.base.spec, self.base.dtype, cache=self.base.cache_key is not None,
                                 cache_key=self.base.cache_key)
                if (copy.base.fingerprint, copy.base.tensors) != (self.base.fingerprint, self.base.tensors):
                    raise ValueError(f"the base read again for the merge check and export (fingerprint "
                                     f"{short(copy.base.fingerprint)}) is not the one trained on "
                                     f"({short(self.base.fingerprint)}): was the base cache changed during the run?")
                missing = set(adapters) - set(copy.model.state_dict())
                if missing:
                    raise ValueError(f"whole_model: the rebuilt model lacks adapter tensors {sorted(missing)[:2]}")
                copy.model.load_state_dict(adapters, strict=False)
                whole = copy.model.eval()
            self._whole = (self.global_step, whole)
        return self._whole[1]

    def on_fit_end(self) -> None:
        self.whole_model()  # a sharded run gathers here, while every rank is still in the fit (for after_fit)

    def _stop(self, what: str) -> None:
        ckpt = getattr(self._trainer.checkpoint_callback, "last_model_path", "") if self._trainer else ""
        raise NonFiniteLossError(
            f"{what} at global step {self.global_step}: training stopped; the last good checkpoint is "
            f"{ckpt or '(none written yet)'}; lower model.lr or check the data"
        )

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()
        self._whole = None  # a gathered copy (sharded runs) is stale once training goes on
        # adapter dropout masks depend on (seed, step, micro-batch, rank) only, not on how many random
        # numbers were drawn before (dataloader iterators, validation): a resumed run draws the same ones
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        rank = self._trainer.global_rank if self._trainer is not None else 0
        torch.manual_seed((seed * 1_000_003 + self.global_step * 4_099 + batch_idx * 131 + rank) % 2**63)

    def training_step(self, batch, batch_idx):
        loss, _ = self.compute_loss(batch)
        tokens = next_token_labels(batch["labels"])[1].sum()
        self._window_tokens = self._window_tokens + tokens
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        # a token sum, scaled once per optimizer step (on_before_optimizer_step); Lightning divides it by
        # accumulate_grad_batches and DDP averages over ranks, and the scale below undoes both
        return loss * tokens

    def on_before_optimizer_step(self, optimizer) -> None:
        trainer = self._trainer
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        total = trainer.strategy.reduce(self._window_tokens.float(), reduce_op="sum") if world > 1 \
            else self._window_tokens.float()
        scale = world * accumulate / total.clamp(min=1)
        finite = torch.ones((), device=self.device)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
                local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's rows
                finite = finite * torch.isfinite(local).all()
        if world > 1:  # every rank stops together, none is left waiting in an all-reduce
            finite = trainer.strategy.reduce(finite, reduce_op="min")
        self._window_tokens = torch.zeros((), dtype=torch.long, device=self.device)
        if not bool(finite):  # one scalar sync per optimizer step
            self._stop(f"loss is {self._last_loss.item()}" if not torch.isfinite(self._last_loss)
                       else "gradients are not finite")

    def on_train_start(self) -> None:
        self._window_tokens = torch.zeros((), dtype=torch.long, device=self.device)
        if self.lowbit_precision is not None and self.lowbit_precision.dtype == torch.float16:
            raise ValueError("LowBitPrecision dtype=float16 has no loss scaling yet, so gradients can underflow: "
                             "train with dtype=bfloat16 (or float32)")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = batch["attention_mask"].sum() * (self._trainer.world_size if self._trainer else 1)
        self.log("train/tokens_per_s", tokens.float() / elapsed, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/peak_mem_gb", peak_memory_gb(self.device))

    def validation_step(self, batch, batch_idx):
        loss, predicted = self.compute_loss(batch, predictions=True)
        targets, mask = next_token_labels(batch["labels"])
        correct = (predicted == targets) & mask
        self.val_loss.update(loss, weight=mask.sum())
        self.val_accuracy.update(correct.sum() / mask.sum().clamp(min=1), weight=mask.sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss),
                       "val/token_accuracy": self.val_accuracy.compute()}, prog_bar=True, sync_dist=True)
        self.val_loss.reset()
        self.val_accuracy.reset()

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(h.optimizer, params, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        total = self._trainer.max_steps if self._trainer is not None else -1
        if h.scheduler == "cosine" and (total is None or total < 1):
            raise ValueError("model.scheduler='cosine' needs trainer.max_steps > 0 to know where to end")

        def factor(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            if h.scheduler == "cosine":
                progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: adapters + optimizer + config, never the base ------------------------------
    def adapter_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.adapter_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lowbit_base"] = self.base.record()  # what export / validate / resume must rebuild
        checkpoint["lowbit_adapter"] = {"adapter": self.hparams.adapter, "hparams": self.adapter_hparams()}

    def adapter_hparams(self) -> dict:
        """The attached adapters' hyper-parameters, defaults resolved (e.g. QA-LoRA's pooling)."""
        layers = adapters.adapted_layers(self.model)
        return dict(next(iter(layers.values())).adapter.hparams) if layers else {}

    def _check_adapter_record(self, checkpoint: dict) -> None:
        """The adapters must be built as the checkpoint's were: a checkpoint written before an hparam
        existed (no "lowbit_adapter" record) was trained with the adapter's `legacy_hparams`."""
        record = checkpoint.get("lowbit_adapter")
        cls = adapters.get_adapter_class(self.hparams.adapter)
        recorded = cls.current_names(record["hparams"]) if record else cls.legacy_hparams
        live = self.adapter_hparams()
        differ = sorted(k for k in recorded if live.get(k) != recorded[k])
        if differ:
            key = differ[0]
            raise ValueError(
                f"checkpoint's {self.hparams.adapter} adapters were trained with {key}={recorded[key]!r}, this model "
                f"builds {key}={live.get(key)!r}: set model.adapter_args.{key}={recorded[key]!r} to continue from it"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, found = self.adapter_state_keys(), set(checkpoint.get("state_dict", {}))
        if expected != found:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(
                f"checkpoint does not match this model's adapters (missing {missing[:2]}, unexpected "
                f"{unexpected[:2]}): resume with the same model.* settings it was trained with"
            )
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters() if p.requires_grad}
        for name, tensor in checkpoint["state_dict"].items():
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"checkpoint tensor {name} is {tuple(tensor.shape)}, this model's {shapes[name]}: "
                                 "the checkpoint was trained with other adapter settings (model.r, adapter_args); "
                                 "resume or export with the settings it was trained with")
        self._check_adapter_record(checkpoint)
        recorded = checkpoint.get("lowbit_base")
        if not recorded or self.base is None:
            return
        if recorded["fingerprint"] != self.base.fingerprint:
            raise ValueError(
                f"the base {self.base.source!r} (fingerprint {short(self.base.fingerprint)}) is not the one this "
                f"checkpoint was trained on ({recorded['source']!r}, {recorded['layout']}, fingerprint "
                f"{short(recorded['fingerprint'])}): point model.base (export: --base) at that base"
            )
        check_digests(recorded.get("tensors"), self.base.tensors, "the checkpoint",
                      "point model.base (export: --base) at the base it was trained on")


def build_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"model.optimizer={name!r} needs bitsandbytes (pip install bitsandbytes, CUDA); "
                         "use model.optimizer=adamw") from None
    return (bnb.optim.PagedAdamW if name == "paged_adamw" else bnb.optim.AdamW8bit)(params, **kwargs)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or on CPU the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            line = next(x for x in status if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return float("nan")
