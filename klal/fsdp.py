"""FSDP for any supported VLM family with LoRA, and gathering the adapter from a sharded model.

:class:`KLALFSDPStrategy` wraps each language decoder layer (and each vision block) as one FSDP unit, with
``use_orig_params=True`` so frozen base weights and trainable LoRA weights can share a unit. FSDP flattens each unit
into one tensor of one dtype: load the backbone in float32 (``model.backbone.dtype: float32``) and let
``precision: bf16-mixed`` compute in bfloat16; the strategy refuses a unit with mixed dtypes and says so.
:func:`adapter_state_dict` gathers the peft model's weights from whatever strategy holds them (a collective under
FSDP); :func:`strip_wrapper_prefixes` names parameters as the gathered state dict does.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

__all__ = [
    "FSDP_WRAPPER_PREFIXES",
    "KLALFSDPStrategy",
    "adapter_state_dict",
    "mixed_dtype_units",
    "strip_wrapper_prefixes",
]

# Inserted into parameter names by FSDP wrapping and by torch activation-checkpoint wrappers.
FSDP_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def mixed_dtype_units(model: torch.nn.Module, unit_classes: set[type[torch.nn.Module]]) -> dict[str, list[str]]:
    """Units that FSDP would flatten from parameters of more than one dtype: ``{module name: [dtypes]}``.

    A unit is each module of ``unit_classes`` (its parameters not inside a nested unit), plus the root with everything
    left over.
    """
    units: dict[str, set[torch.dtype]] = {}

    def visit(module: torch.nn.Module, owner: str, prefix: str) -> None:
        for p in module.parameters(recurse=False):
            units.setdefault(owner, set()).add(p.dtype)
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            visit(child, path if type(child) in unit_classes else owner, f"{path}.")

    visit(model, "<root>", "")
    return {k: sorted(str(d).replace("torch.", "") for d in v) for k, v in units.items() if len(v) > 1}


class KLALFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the model family's wrapping policy and ``use_orig_params=True`` (frozen + LoRA weights).

    The units are the family's decoder layers (and vision blocks,
    :meth:`klal.models.family.VLMFamily.fsdp_wrap_classes`), chosen when the model is set up, so one strategy config
    serves every family.

    Args:
        wrap_vision_blocks: make each vision block an FSDP unit too (else the vision tower joins the root unit).
            Set it to False when the data has text-only samples: a rank whose batch has no image skips the vision
            tower, and with it the all-gathers of those units that the other ranks wait in; the root unit is gathered
            on every rank at every step.
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3-like), ``SHARD_GRAD_OP`` (ZeRO-2-like), ``HYBRID_SHARD``
            (full shard within a node, replicate across nodes) or ``NO_SHARD``.
        state_dict_type: ``full`` (rank 0 gathers; klal checkpoints hold only LoRA weights anyway) or ``sharded``.
        cpu_offload: keep sharded parameters in host memory.
        limit_all_gathers: bound the all-gathers in flight (lower peak memory).
        kwargs: further :class:`lightning.pytorch.strategies.FSDPStrategy` / ``FullyShardedDataParallel`` arguments.
    """

    def __init__(
        self,
        wrap_vision_blocks: bool = True,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("use_orig_params", True)
        if not kwargs["use_orig_params"]:
            raise ValueError("KLALFSDPStrategy needs use_orig_params=True: frozen and LoRA weights share FSDP units")
        super().__init__(
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            limit_all_gathers=limit_all_gathers,
            **kwargs,
        )
        self.wrap_vision_blocks = wrap_vision_blocks

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from klal.models.family import family_of

        if self.root_device.type != "cuda":
            raise ValueError(f"KLALFSDPStrategy needs CUDA devices (trainer.accelerator: gpu), got {self.root_device}")
        self.unit_classes = family_of(_vlm(model)).fsdp_wrap_classes(self.wrap_vision_blocks)
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(self.unit_classes)
        mixed = mixed_dtype_units(model, self.unit_classes)
        if mixed:
            name, dtypes = next(iter(mixed.items()))
            raise ValueError(
                f"FSDP flattens each wrapped unit into one tensor of one dtype, but {len(mixed)} unit(s) mix dtypes "
                f"(e.g. {name}: {dtypes}). Load the backbone in float32 (model.backbone.dtype: float32) and train with "
                "trainer.precision: bf16-mixed, which computes in bfloat16."
            )
        return super()._setup_model(model)


def _vlm(module: torch.nn.Module) -> torch.nn.Module:
    """The VLM inside the LightningModule (its ``model``: peft-wrapped, whose ``config`` names the model type)."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def strip_wrapper_prefixes(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper segments (as in the gathered state dict)."""
    for prefix in FSDP_WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def adapter_state_dict(module: Any, attr: str = "model") -> dict[str, torch.Tensor] | None:
    """The state dict of ``module.<attr>`` (the peft model), gathered from whatever strategy holds it.

    A collective under FSDP (every rank must call it). Returns the full tensors, keyed as in
    ``module.<attr>.state_dict()``, on the ranks that receive them (FSDP ``full``: rank 0 only; DDP/DeepSpeed ZeRO-2:
    every rank), None elsewhere. Pass it to ``module.<attr>.save_pretrained(path, state_dict=...)``, which keeps only
    the adapter weights.
    """
    trainer = getattr(module, "_trainer", None)
    full = trainer.strategy.lightning_module_state_dict() if trainer is not None else module.state_dict()
    if not full:
        return None
    prefix = f"{attr}."
    return {strip_wrapper_prefixes(k[len(prefix) :]): v for k, v in full.items() if k.startswith(prefix)}
