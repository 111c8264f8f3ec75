"""Pieces for multi-GPU and multi-node training: loss normalisation across ranks, FSDP wrapping of Qwen2.5-VL with
LoRA, gathering the adapter from a sharded model, and the flash-attention fallback.

Loss normalisation. Data parallelism (DDP, FSDP, DeepSpeed) averages gradients over ranks. A rank's loss that is a
mean over its own items (answer tokens for NTP, samples with a map for KLAL) therefore weights ranks equally, not
items: with 10 answer tokens on one rank and 2 on the other, each of the 2 counts five times as much as each of the
10. :func:`global_share` gives the factor ``world_size x local_count / global_count`` that turns a rank's local mean
into its share of the mean over the whole global batch, so after gradient averaging the update is the one a single
process would compute on the same global batch.

FSDP. :class:`KLALFSDPStrategy` wraps each language decoder layer (and each vision block) as one FSDP unit, with
``use_orig_params=True`` so frozen base weights and trainable LoRA weights can share a unit. FSDP flattens each unit
into one tensor of one dtype: load the backbone in float32 (``model.backbone.dtype: float32``) and let
``precision: bf16-mixed`` compute in bfloat16; the strategy refuses a unit with mixed dtypes and says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

__all__ = [
    "FSDP_WRAPPER_PREFIXES",
    "KLALFSDPStrategy",
    "adapter_state_dict",
    "flash_attention_available",
    "global_share",
    "mixed_dtype_units",
    "qwen_wrap_modules",
    "resolve_attn_implementation",
    "strip_wrapper_prefixes",
]

log = logging.getLogger(__name__)

FLASH = "flash_attention_2"
# Inserted into parameter names by FSDP wrapping and by torch activation-checkpoint wrappers.
FSDP_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


# -- attention kernel --------------------------------------------------------------------------------------------------
def flash_attention_available() -> bool:
    """Whether transformers can run ``flash_attention_2`` here (the ``flash_attn`` package and a CUDA device)."""
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def resolve_attn_implementation(name: str) -> str:
    """``name``, except that ``flash_attention_2`` becomes ``sdpa`` (with a warning) where flash-attn cannot run.

    Configs can then ask for flash-attention-2 everywhere: machines with ``flash_attn`` installed use it, others
    (CPU, or no ``pip install flash-attn``) run the same config on sdpa, which gives the same results up to kernel
    rounding.
    """
    if name == FLASH and not flash_attention_available():
        log.warning(
            "attn_implementation=flash_attention_2, but flash-attn cannot run here (not installed or no CUDA): "
            "using sdpa"
        )
        return "sdpa"
    return name


# -- cross-rank loss normalisation -------------------------------------------------------------------------------------
def _process_group_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def global_share(local_counts: torch.Tensor) -> torch.Tensor:
    """``world_size x local / sum_over_ranks(local)`` for each entry of ``local_counts`` (ones without a process group).

    Multiply a rank's mean over its own items by the matching entry and data-parallel gradient averaging gives the
    mean over all items of the global batch; the ranks' logged values then average to that global mean too. An entry
    whose global count is 0 gives 0. A collective: every rank must call it the same number of times.

    Args:
        local_counts: ``(K,)`` item counts of this rank (e.g. supervised tokens, samples with a map).
    """
    world = _process_group_size()
    if world == 1:
        return torch.ones_like(local_counts, dtype=torch.float32)
    local = local_counts.detach().to(torch.float32)
    total = local.clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return world * local / total.clamp_min(1.0)


# -- FSDP --------------------------------------------------------------------------------------------------------------
def qwen_wrap_modules(vision_blocks: bool = True) -> set[type[torch.nn.Module]]:
    """The Qwen2.5-VL module classes that become FSDP units: the language decoder layers (and the vision blocks)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    return {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock} if vision_blocks else {Qwen2_5_VLDecoderLayer}


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
    """Lightning's FSDP with the Qwen2.5-VL wrapping policy and ``use_orig_params=True`` (frozen + LoRA weights).

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
            auto_wrap_policy=qwen_wrap_modules(wrap_vision_blocks),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            limit_all_gathers=limit_all_gathers,
            **kwargs,
        )
        self.unit_classes = qwen_wrap_modules(wrap_vision_blocks)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cuda":
            raise ValueError(f"KLALFSDPStrategy needs CUDA devices (trainer.accelerator: gpu), got {self.root_device}")
        mixed = mixed_dtype_units(model, self.unit_classes)
        if mixed:
            name, dtypes = next(iter(mixed.items()))
            raise ValueError(
                f"FSDP flattens each wrapped unit into one tensor of one dtype, but {len(mixed)} unit(s) mix dtypes "
                f"(e.g. {name}: {dtypes}). Load the backbone in float32 (model.backbone.dtype: float32) and train with "
                "trainer.precision: bf16-mixed, which computes in bfloat16."
            )
        return super()._setup_model(model)


# -- adapter from a sharded model --------------------------------------------------------------------------------------
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
