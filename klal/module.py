"""The Lightning task: LoRA fine-tuning of a VLM with ``loss = ntp + klal_weight * klal``.

The model is built in :meth:`KLALModule.configure_model`, so FSDP/DeepSpeed strategies can shard it at construction.
Checkpoints hold only the trainable (LoRA) weights plus hyperparameters; at the end of ``fit`` the adapter is written
with peft's ``save_pretrained`` so ``PeftModel.from_pretrained(base, path)`` loads it.

Text-only samples (no image) train with NTP only. A batch without any image carries no ``pixel_values``, so the model
skips its vision tower; the tower is frozen, so under DDP a rank that skipped it owes no gradients for it, and KLAL
stays a graph-connected zero (:mod:`klal.loss`), so every rank reduces the same LoRA gradients.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch

from klal.capture import CaptureRequest, QueryMode, attention_layer_ids, enable_capture, select_queries
from klal.checkpoint.adapter import save_adapter
from klal.checkpoint.compat import base_fingerprint, check_compatible, check_trainable_keys, lora_fingerprint
from klal.checkpoint.resume import flush_csv_metrics
from klal.checkpoint.rng import gather_rng_states, restore_rng_states
from klal.data.collate import IGNORE_INDEX, KLALBatch
from klal.fsdp import adapter_state_dict, strip_wrapper_prefixes
from klal.global_batch import global_share
from klal.loss import KLALResult, klal_loss
from klal.models.family import nest_grids
from klal.models.loader import (
    ModelConfig,
    load_model_and_processor,
    load_processor,
    model_family,
    text_config,
    with_saved_pixel_bounds,
)
from klal.models.lora import LoraSettings, apply_lora, language_lora_regex


@dataclass
class OptimSettings:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps (optimizer steps)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of ``lr``."""


class KLALModule(L.LightningModule):
    """LoRA fine-tuning with next-token loss plus the KL attention loss.

    Args:
        backbone: which VLM to load and how (``tiny`` builds the embedded random test model; any supported family).
        lora: LoRA rank/alpha/dropout, targets and layers.
        klal_weight: lambda in ``ntp + lambda * klal``; 0 trains NTP only (attention is still measured).
        klal_query: which query tokens' attention is supervised (``last`` answer token as in the paper).
        klal_layers: supervised language layers: ``all``, ``"4-11"``, ``"-8:"`` or a list, counting the
            full-attention layers only (every layer except on hybrid models such as Qwen3.5).
        klal_epsilon: smoothing weight of the target map (keeps KL finite).
        klal_image_mode: several images per sample: ``joint`` or ``per_image`` (see :mod:`klal.loss`).
        measure_attention_when_unweighted: with ``klal_weight=0``, still capture attention to log ``klal`` and
            ``target_mass`` (measured without autograd: the maps only, ``(L, B, A, V)`` floats; docs/performance.md).
            False skips the capture: the NTP arm then logs neither.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers (the capture keeps one
            set of maps per step; the recomputation during backward stores none).
        optim: optimizer and schedule.
        adapter_dir: where the final peft adapter is written (default: ``<log_dir>/adapter``).
    """

    def __init__(
        self,
        backbone: ModelConfig = ModelConfig(),  # noqa: B008 - read-only default, jsonargparse needs an instance
        lora: LoraSettings = LoraSettings(),  # noqa: B008
        klal_weight: float = 1.0,
        klal_query: QueryMode = "last",
        klal_layers: str | list[int] | None = "all",
        klal_epsilon: float = 1e-4,
        klal_image_mode: Literal["joint", "per_image"] = "joint",
        measure_attention_when_unweighted: bool = True,
        gradient_checkpointing: bool = False,
        optim: OptimSettings = OptimSettings(),  # noqa: B008
        adapter_dir: str | None = None,
    ) -> None:
        super().__init__()
        if klal_weight < 0 or not math.isfinite(klal_weight):
            raise ValueError(f"klal_weight must be a finite number >= 0, got {klal_weight}")
        check_optim(optim or OptimSettings())
        # A folder klal exported keeps its saved pixel bounds (unless set here), in the processor and in the record.
        self.backbone = (
            with_saved_pixel_bounds(backbone) if backbone and not backbone.is_tiny else backbone or ModelConfig()
        )
        self.lora = lora or LoraSettings()
        self.klal_weight = float(klal_weight)
        self.klal_query: QueryMode = klal_query
        self.klal_layers_spec = klal_layers
        self.klal_epsilon = klal_epsilon
        self.klal_image_mode = klal_image_mode
        self.measure_attention = measure_attention_when_unweighted
        self.gradient_checkpointing = gradient_checkpointing
        self.optim = optim or OptimSettings()
        self.adapter_dir = adapter_dir
        self.save_hyperparameters()
        # Checkpoints hold only trainable weights, so loading must not demand the frozen base.
        self.strict_loading = False
        self.family = model_family(self.backbone)
        self.processor = load_processor(self.backbone)
        self.model: torch.nn.Module | None = None
        self.layers: list[int] = []

    # -- model ------------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the backbone, wrap the language model with LoRA, switch on attention capture."""
        if self.model is not None:
            return
        cfg = self.backbone
        model, _ = load_model_and_processor(cfg, processor=self.processor)
        # Capture computes the supervised attention rows itself and hands the output to the kernel the backbone was
        # loaded with (backbone.attn_implementation, the one place that chooses it; flash-attn falls back to sdpa).
        enable_capture(model)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            # LoRA-only training has no trainable input embedding; checkpointed layers still need grad-enabled inputs.
            model.enable_input_require_grads()
        # Recorded now, while every weight is whole on this process (FSDP shards them later).
        self._base_identity = base_fingerprint(self.backbone, model)
        check_lora_rank(model, self.lora)
        self.model = apply_lora(model, self.lora)
        self.model.train()
        self.layers = attention_layer_ids(self.klal_layers_spec, self.family.attention_layers(self.text_config))

    @property
    def text_config(self):
        """The language model's config (None before :meth:`configure_model`)."""
        return text_config(self.model) if self.model is not None else None

    @property
    def image_token_id(self) -> int:
        """Id of the token of one grid cell (:meth:`klal.models.family.VLMFamily.grid_token_id`)."""
        return self.family.grid_token_id(self.processor)

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, batch: KLALBatch, capture: bool = True, query_mode: QueryMode | None = None):
        """Run the model on a collated batch; returns ``(outputs, CaptureRequest | None)``."""
        inputs = {k: batch[k] for k in (*self.family.input_keys, "labels") if k in batch}
        request = None
        if capture:
            grids = nest_grids(batch["grids"], batch["grid_image"])
            visual = self.family.visual_token_mask(batch["input_ids"], self.image_token_id, grids)
            query = select_queries(batch["answer_mask"], query_mode or self.klal_query, batch.get("word_mask"))
            request = CaptureRequest.from_masks(query, visual, self.layers)
            # Maps that only feed logged metrics (klal_weight 0, validation) are measured without autograd: nothing
            # saved for backward, nothing recomputed under gradient checkpointing.
            request.needs_grad = self.klal_weight > 0 and torch.is_grad_enabled()
            inputs["klal_capture"] = request
        out = self.model(**inputs, use_cache=False)
        return out, request

    def klal_result(self, request: CaptureRequest, batch: KLALBatch) -> KLALResult:
        """KLAL and target mass of the maps a forward pass captured into ``request`` (the maps are released and the
        request closed, so the gradient-checkpoint recomputation during backward stores none again)."""
        log_q = request.stacked()  # (L, B, A, V)
        request.clear()
        return klal_loss(
            log_q,
            batch["target"],
            batch["has_target"],
            request.query_valid,
            request.key_valid,
            epsilon=self.klal_epsilon,
            key_image=batch.get("key_image"),
            image_mode=self.klal_image_mode,
        )

    def compute_losses(self, batch: KLALBatch, across_ranks: bool = False) -> dict[str, torch.Tensor]:
        """Loss parts of one batch: ``loss``, ``ntp``, ``klal``, ``target_mass``, ``maps`` (samples with a map).

        With ``across_ranks`` (the training and validation steps, which every rank runs) NTP, KLAL and target mass
        become this rank's share of their means over the whole global batch (:func:`klal.global_batch.global_share`),
        so data-parallel gradient averaging gives the update of one process on the same global batch. A collective
        when a process group is up; without one it changes nothing.
        """
        capture = self.klal_weight > 0 or self.measure_attention
        out, request = self(batch, capture=capture)
        ntp = out.loss
        res = self.klal_result(request, batch) if request is not None else None
        share = torch.ones(2, device=ntp.device)
        if across_ranks:
            # NTP is a mean over supervised next-token labels (shifted by one), KLAL a mean over samples with a map.
            n_tok = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            n_map = res.has_map.sum() if res is not None else torch.zeros_like(n_tok)
            share = global_share(torch.stack([n_tok, n_map.to(n_tok.device)]))
            ntp = ntp * share[0]
        parts: dict[str, torch.Tensor] = {"ntp": ntp}
        if res is not None:
            klal = res.klal * share[1] if self.klal_weight > 0 else (res.klal * share[1]).detach()
            parts.update(klal=klal, target_mass=res.target_mass * share[1], maps=res.has_map.sum())
            parts["loss"] = ntp + self.klal_weight * klal if self.klal_weight > 0 else ntp
        else:
            parts["loss"] = ntp
        return parts

    def _step(self, batch: KLALBatch, stage: str) -> torch.Tensor:
        parts = self.compute_losses(batch, across_ranks=True)
        loss = parts["loss"]
        bad_here = not bool(torch.isfinite(loss))
        # Under DDP every rank must stop together: a rank that raised alone would leave the others waiting in the
        # gradient all-reduce.
        multi = self._trainer is not None and self.trainer.world_size > 1
        bad = self.trainer.strategy.reduce_boolean_decision(bad_here, all=False) if multi else bad_here
        if bad:
            where = f"{stage} loss at global step {self.global_step} (optimizer steps done; this batch's update "
            where += f"was not applied), epoch {self.current_epoch}"
            if bad_here:
                klal = parts.get("klal", torch.tensor(0.0)).item()
                msg = f"non-finite {where}: loss={loss.item()}, ntp={parts['ntp'].item()}, klal={klal}"
            else:
                msg = f"non-finite {where} on another rank (its log names the samples); this rank's loss was finite"
            raise FloatingPointError(f"{msg}; batch sample ids: {batch.get('ids')}")
        bs = int(batch["input_ids"].shape[0])
        on_step = stage == "train"
        for name in ("loss", "ntp", "klal", "target_mass"):
            if name in parts:
                self.log(
                    f"{stage}/{name}",
                    parts[name].detach().float(),
                    on_step=on_step,
                    on_epoch=True,
                    prog_bar=name in ("loss", "klal", "target_mass"),
                    batch_size=bs,
                    sync_dist=True,
                )
        no_map = bs - int(parts["maps"].item()) if "maps" in parts else 0
        self.log(
            f"{stage}/no_map",
            float(no_map),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            batch_size=bs,
            sync_dist=True,
        )
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The previous step's CSV row goes to disk now, so a killed run keeps every row up to its last checkpoint.
        if self._trainer is not None:
            flush_csv_metrics(self.trainer)

    def training_step(self, batch: KLALBatch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: KLALBatch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    # -- optimisation -----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check the LoRA targets/layers")
        o = self.optim
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(o.warmup_steps, max(total - 1, 0))

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def trainable_names(self) -> set[str]:
        """State-dict keys (``model.`` + parameter name, without FSDP / checkpoint-wrapper segments) of the parameters
        that train (the LoRA weights)."""
        # Under FSDP parameter names carry wrapper segments that the (gathered) state dict does not.
        return {f"model.{strip_wrapper_prefixes(n)}" for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (the LoRA weights), keyed as in ``self.state_dict()``."""
        names = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if strip_wrapper_prefixes(k) in names}

    def checkpoint_fingerprint(self) -> dict[str, dict[str, Any]]:
        """What this run's trainable weights belong to: the base model and the LoRA configuration."""
        if self.model is None:
            self.configure_model()
        return {
            "base": self._base_identity,
            "lora": lora_fingerprint(self.lora, self.text_config.num_hidden_layers),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Filter by name: the strategy already gathered the state dict (FSDP: on rank 0 only, others get {}), and a
        # second self.state_dict() would gather the whole sharded model again, on every rank.
        names = self.trainable_names()
        state = checkpoint.get("state_dict") or {}
        checkpoint["state_dict"] = {k: v for k, v in state.items() if strip_wrapper_prefixes(k) in names}
        checkpoint["klal_base_model"] = self.backbone.name_or_path
        checkpoint["klal_fingerprint"] = self.checkpoint_fingerprint()
        # Lightning stores no RNG state; every rank's goes in so dropout continues as in an uninterrupted run.
        checkpoint["klal_rng"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        source = f"checkpoint {trainer.ckpt_path}" if trainer is not None and trainer.ckpt_path else "checkpoint"
        fp = self.checkpoint_fingerprint()
        check_compatible(checkpoint, fp["base"], fp["lora"], source=source)
        if "state_dict" in checkpoint:
            check_trainable_keys(checkpoint["state_dict"], self.trainable_state_dict(), source=source)
        elif trainer is not None and not _strategy_loads_weights_itself(trainer.strategy):
            raise ValueError(f"{source} holds no weights (no 'state_dict'); is it a Lightning checkpoint of klal?")
        # Else the strategy restored the weights before this hook and passes no state dict (FSDP pops it from a full
        # checkpoint, DeepSpeed keeps weights in its own files): the fingerprints above are the check there.
        # Applied in on_train_start: the sanity check and loader setup between here and training must not shift it.
        self._rng_to_restore = checkpoint.get("klal_rng")

    def on_train_start(self) -> None:
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states:
            restore_rng_states(states, self.global_rank)

    def on_train_end(self) -> None:
        # trainer.log_dir broadcasts under DDP, so every rank resolves the path before rank 0 writes.
        path = self.resolve_adapter_dir()
        # Under FSDP gathering the weights is a collective: every rank takes part before rank 0 writes.
        sharded = "FSDP" in type(self.trainer.strategy).__name__
        state = adapter_state_dict(self) if sharded else None
        if self.trainer.is_global_zero:
            save_adapter(
                self.model,
                path,
                self.backbone,
                self.lora,
                self.checkpoint_fingerprint(),
                processor=self.processor,
                state_dict=state,
            )
        self.trainer.strategy.barrier("klal_adapter_saved")

    def resolve_adapter_dir(self) -> str:
        """Where the final adapter goes."""
        if self.adapter_dir:
            return self.adapter_dir
        root = self.trainer.log_dir if self.trainer is not None and self.trainer.log_dir else "."
        return os.path.join(root, "adapter")


def check_optim(o: OptimSettings) -> None:
    """Refuse optimizer settings AdamW or the schedule would reject later with a message that names no option.

    Raises:
        ValueError: naming the ``model.optim`` option and the value.
    """

    def bad(name: str, value: Any, need: str) -> ValueError:
        return ValueError(f"model.optim.{name} must be {need}, got {value!r}")

    if not (math.isfinite(o.lr) and o.lr > 0):
        raise bad("lr", o.lr, "a finite number > 0")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise bad("weight_decay", o.weight_decay, "a finite number >= 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise bad("betas", o.betas, "two numbers in [0, 1)")
    if o.warmup_steps < 0:
        raise bad("warmup_steps", o.warmup_steps, ">= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise bad("min_lr_ratio", o.min_lr_ratio, "in [0, 1]")


def check_lora_rank(model: torch.nn.Module, lora: LoraSettings) -> None:
    """Refuse a LoRA rank larger than a layer it adapts is wide: ``B @ A`` of a ``d_in -> d_out`` layer has rank at
    most ``min(d_in, d_out)``, so a larger ``r`` only adds parameters (and memory) that change nothing.

    Checked on the base model before peft allocates the LoRA weights.

    Raises:
        ValueError: naming ``model.lora.r``, the narrowest adapted layer and its width.
    """
    num_layers = text_config(model).num_hidden_layers
    pattern = re.compile(language_lora_regex(lora.targets, lora.layers, num_layers))
    widths = [
        (min(m.in_features, m.out_features), name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)
    ]
    if not widths:
        return  # apply_lora reports a regex that matches nothing
    width, name, d_in, d_out = min(widths)
    if lora.r > width:
        raise ValueError(
            f"model.lora.r={lora.r} is larger than the layers it adapts are wide: {name} maps {d_in} -> {d_out}, so "
            f"the LoRA update has rank at most {width}; give model.lora.r <= {width}"
        )


def _strategy_loads_weights_itself(strategy: Any) -> bool:
    """Whether ``strategy`` restores model weights in ``load_checkpoint`` (FSDP, DeepSpeed: their
    ``load_model_state_dict`` is overridden) rather than from ``checkpoint["state_dict"]`` after the hooks."""
    from lightning.pytorch.strategies import Strategy

    return type(strategy).load_model_state_dict is not Strategy.load_model_state_dict


__all__ = ["KLALModule", "OptimSettings"]
