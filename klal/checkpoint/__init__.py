"""Checkpoints that survive crashes and load safely, one module per job (import from the module that owns a name):

- :mod:`klal.atomic` (below this package, for every writer of an output): all-or-nothing folders
  (``atomic_save_dir``, ``atomic_output_dir``), ``check_writable``, ``naming_path``;
- :mod:`klal.checkpoint.loading`: weights-only loading (``safe_load``, ``checkpoint_state``, ``UnsafeCheckpointError``,
  ``DamagedCheckpointError``);
- :mod:`klal.checkpoint.lightning_io`: Lightning's checkpoint IO made atomic (``AtomicCheckpointIO``,
  ``use_atomic_checkpoint_io``, ``atomic_torch_save``);
- :mod:`klal.checkpoint.compat`: whether a checkpoint fits this run (``base_fingerprint``, ``lora_fingerprint``,
  ``check_compatible``, ``check_trainable_keys``, ``changed_hparams``, ``check_resume_hparams``);
- :mod:`klal.checkpoint.rng`: every rank's RNG states (``capture_rng_state``, ``restore_rng_state``,
  ``gather_rng_states``, ``restore_rng_states``);
- :mod:`klal.checkpoint.resume`: ``--ckpt_path last`` and the run's ``metrics.csv`` (``find_last_checkpoint``,
  ``resolve_ckpt_path``, ``check_ckpt_path``, ``continue_csv_metrics``, ``flush_csv_metrics``);
- :mod:`klal.checkpoint.adapter`: the exported peft adapter (``ADAPTER_INFO``, ``save_adapter``, ``read_adapter_info``,
  ``embedding_layers_trained``, ``check_adapter_base``).

The names below stay importable from ``klal.checkpoint`` (where they lived when it was one file) for code written
against that; klal itself imports them from their modules.
"""

from klal.atomic import atomic_output_dir, atomic_save_dir, check_writable, naming_path
from klal.checkpoint.adapter import (
    ADAPTER_INFO,
    check_adapter_base,
    embedding_layers_trained,
    read_adapter_info,
    save_adapter,
)
from klal.checkpoint.compat import (
    base_fingerprint,
    changed_hparams,
    check_compatible,
    check_resume_hparams,
    check_trainable_keys,
    lora_fingerprint,
)
from klal.checkpoint.lightning_io import AtomicCheckpointIO, atomic_torch_save, use_atomic_checkpoint_io
from klal.checkpoint.loading import DamagedCheckpointError, UnsafeCheckpointError, checkpoint_state, safe_load
from klal.checkpoint.resume import (
    check_ckpt_path,
    continue_csv_metrics,
    find_last_checkpoint,
    flush_csv_metrics,
    resolve_ckpt_path,
)
from klal.checkpoint.rng import capture_rng_state, gather_rng_states, restore_rng_state, restore_rng_states

__all__ = [
    "ADAPTER_INFO",
    "AtomicCheckpointIO",
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
    "atomic_output_dir",
    "atomic_save_dir",
    "atomic_torch_save",
    "base_fingerprint",
    "capture_rng_state",
    "changed_hparams",
    "check_adapter_base",
    "check_ckpt_path",
    "check_compatible",
    "check_resume_hparams",
    "check_trainable_keys",
    "check_writable",
    "checkpoint_state",
    "continue_csv_metrics",
    "embedding_layers_trained",
    "find_last_checkpoint",
    "flush_csv_metrics",
    "gather_rng_states",
    "lora_fingerprint",
    "naming_path",
    "read_adapter_info",
    "resolve_ckpt_path",
    "restore_rng_state",
    "restore_rng_states",
    "safe_load",
    "save_adapter",
    "use_atomic_checkpoint_io",
]
